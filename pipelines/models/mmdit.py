"""Open-Sora 2.0 video MMDiT: a Flux-style double/single-stream transformer with 3D RoPE.

Written from the architecture description of hpcaitech/Open-Sora (opensora/models/mmdit), itself derived from
black-forest-labs/flux. Parameter names follow the released checkpoint so `Open_Sora_v2.safetensors` loads strictly.

Shapes: B batch, L_img packed latent tokens, L_txt text tokens, D hidden size, H heads, Dh head dim.
Time convention (whole project): t=1 is pure noise, t=0 is data, and the model predicts v = noise - data.
With `prediction="data"` (not upstream) the last layer predicts the clean latent x̂ instead, and the forward still
returns the velocity (x_t - x̂) / t, so losses and samplers are unchanged. A token wider than the model cannot carry
its own noise through the blocks; predicting data, the noise reaches the output through x_t itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipelines.models.config import UpstreamConfig

PREDICTIONS = ("velocity", "data")
DATA_PREDICTION_MIN_T = 0.05  # (x_t - x̂) / t divides by at least this: near t=0 an error in x̂ is not blown up 1/t


@dataclass(frozen=True)
class MMDiTConfig(UpstreamConfig):
    KIND = "MMDiT"

    in_channels: int = 64  # packed latent features: latent channels x patch_size**2
    vec_in_dim: int = 768  # pooled text vector (CLIP-L)
    context_in_dim: int = 4096  # per-token text features (T5-XXL)
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims for (t, h, w); sums to the head dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False
    fused_qkv: bool = False
    cond_embed: bool = False
    patch_size: int = 2
    use_liger_rope: bool = True  # True: rotate-half RoPE (released weights); False: Flux's interleaved pairs
    grad_ckpt_settings: tuple[int, int] | None = field(default=None)  # checkpoint the first (n_double, n_single)
    prediction: str = "velocity"  # what the last layer predicts: "velocity" (upstream) or "data" (see module doc)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {self.prediction!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {list(self.axes_dim)} must sum to the head dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def latent_channels(self) -> int:
        return self.in_channels // self.patch_size**2


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000), laid out as [cos | sin]."""
    t = time_factor * t  # (B,)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def rope_frequencies(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[Tensor, Tensor]:
    """cos/sin tables (B, L, Dh/2) for ids (B, L, n_axes): per axis, angles pos * theta^(-2j/d)."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=ids.device) / dim)  # (d/2,)
        angles.append(ids[..., axis].float()[..., None] * omega)  # (B, L, d/2)
    angle = torch.cat(angles, dim=-1)  # (B, L, Dh/2)
    return angle.cos(), angle.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, rotate_half: bool) -> Tensor:
    """Rotate q or k (B, H, L, Dh) by per-token angles (B, L, Dh/2), in fp32.

    rotate_half pairs dim d with d + Dh/2 (the released weights); otherwise Flux's interleaved (2d, 2d+1) pairs.
    """
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, L, Dh/2): broadcast over heads
    xf = x.float()
    if rotate_half:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return out.type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: tuple[Tensor, Tensor], rotate_half: bool) -> Tensor:
    """Joint full attention with RoPE, no mask (text padding is attended, as upstream). (B,H,L,Dh) -> (B,L,H*Dh)."""
    q, k = apply_rope(q, *pe, rotate_half), apply_rope(k, *pe, rotate_half)
    x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh)
    return rearrange(x, "b h l d -> b l (h d)")


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class Modulation(nn.Module):
    """adaLN parameters from the conditioning vector: (shift, scale, gate) once or twice."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # each (B, 1, D)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift


class StreamAttention(nn.Module):
    """q/k/v projections, QK-norm and output projection of one stream of a double block."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        dim, self.num_heads = cfg.hidden_size, cfg.num_heads
        self.fused = cfg.fused_qkv
        if self.fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, dim, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.norm = QKNorm(cfg.head_dim)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, D) -> q, k, v each (B, H, L, Dh), q and k RMS-normalised."""
        if self.fused:
            q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        else:
            q, k, v = (rearrange(p(x), "b l (h d) -> b h l d", h=self.num_heads)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.norm(q, k, v)
        return q, k, v


def build_mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, joint attention over cat(txt, img)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.rotate_half = cfg.use_liger_rope
        self.img_mod = Modulation(cfg.hidden_size, double=True)
        self.img_attn = StreamAttention(cfg)
        self.img_mlp = build_mlp(cfg.hidden_size, cfg.mlp_hidden_dim)
        self.txt_mod = Modulation(cfg.hidden_size, double=True)
        self.txt_attn = StreamAttention(cfg)
        self.txt_mlp = build_mlp(cfg.hidden_size, cfg.mlp_hidden_dim)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv_heads(modulate(img, i_shift1, i_scale1))  # (B, H, L_img, Dh)
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(txt, t_shift1, t_scale1))  # (B, H, L_txt, Dh)
        attn = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe,
                         self.rotate_half)  # (B, L_txt + L_img, D)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp(modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp(modulate(txt, t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Shared weights over cat(txt, img); attention and MLP run in parallel from one input projection."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        dim, self.mlp_dim, self.num_heads = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.num_heads
        self.rotate_half, self.fused = cfg.use_liger_rope, cfg.fused_qkv
        if self.fused:
            self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_dim)
        else:
            self.q_proj = nn.Linear(dim, dim)
            self.k_proj = nn.Linear(dim, dim)
            self.v_mlp = nn.Linear(dim, dim + self.mlp_dim)
        self.linear2 = nn.Linear(dim + self.mlp_dim, dim)
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        x_mod = modulate(x, shift, scale)  # (B, L, D)
        dim = x.shape[-1]
        if self.fused:
            qkv, mlp = torch.split(self.linear1(x_mod), [3 * dim, self.mlp_dim], dim=-1)
            q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        else:
            v, mlp = torch.split(self.v_mlp(x_mod), [dim, self.mlp_dim], dim=-1)
            q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=self.num_heads)
                       for t in (self.q_proj(x_mod), self.k_proj(x_mod), v))
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe, self.rotate_half)  # (B, L, D)
        return x + gate * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)  # (B, D) each
        return self.linear(modulate(x, shift[:, None], scale[:, None]))


class MMDiT(nn.Module):
    """The Open-Sora 2.0 video transformer. Inputs are packed latents; see `pipelines.sampling.pack`."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if cfg.guidance_embed else nn.Identity()
        # The condition (mask + masked latent, packed) is *added* to the image tokens, not concatenated.
        self.cond_in = nn.Linear(cfg.in_channels + cfg.patch_size**2, dim) if cfg.cond_embed else nn.Identity()
        self.txt_in = nn.Linear(cfg.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(dim, cfg.out_channels)
        self.gradient_checkpointing = False

    def initialize_weights(self) -> None:
        """Training init: Xavier linears, zero condition input and zero output so a fresh model predicts 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias) if module.bias is not None else None
        for block in [*self.double_blocks, *self.single_blocks]:
            for mod in (m for m in block.modules() if isinstance(m, Modulation)):
                nn.init.zeros_(mod.lin.weight)
                nn.init.zeros_(mod.lin.bias)
        if isinstance(self.cond_in, nn.Linear):
            nn.init.zeros_(self.cond_in.weight)
            nn.init.zeros_(self.cond_in.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def blocks_to_shard(self) -> list[nn.Module]:
        """The units FSDP shards one by one."""
        return [*self.double_blocks, *self.single_blocks]

    def embed_vector(self, timesteps: Tensor, y_vec: Tensor, guidance: Tensor | None) -> Tensor:
        vec = self.time_in(timestep_embedding(timesteps, 256))  # (B, D)
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this model has a guidance embedder: pass guidance=")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        return vec + self.vector_in(y_vec)

    def _run(self, block: nn.Module, index: int, kind: int, *args):
        settings = self.config.grad_ckpt_settings
        if self.gradient_checkpointing and self.training and (settings is None or index < settings[kind]):
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y_vec: Tensor, cond: Tensor | None = None, guidance: Tensor | None = None, **_) -> Tensor:
        """img (B, L_img, C_in), img_ids (B, L_img, 3), txt (B, L_txt, C_txt), txt_ids (B, L_txt, 3),
        timesteps (B,), y_vec (B, C_vec), cond (B, L_img, C_in + p^2) -> velocity (B, L_img, C_in),
        whatever the last layer predicts."""
        x = self.img_in(img)  # (B, L_img, D)
        if self.config.cond_embed:
            # t2v passes an all-zero condition; treating None the same keeps callers honest and simple.
            x = x + self.cond_in(cond if cond is not None else img.new_zeros(*img.shape[:2], self.cond_in.in_features))
        vec = self.embed_vector(timesteps, y_vec, guidance)  # (B, D)
        txt = self.txt_in(txt)  # (B, L_txt, D)
        pe = rope_frequencies(torch.cat([txt_ids, img_ids], dim=1), self.config.axes_dim, self.config.theta)
        for i, block in enumerate(self.double_blocks):
            x, txt = self._run(block, i, 0, x, txt, vec, pe)
        x = torch.cat([txt, x], dim=1)  # (B, L_txt + L_img, D)
        for i, block in enumerate(self.single_blocks):
            x = self._run(block, i, 1, x, vec, pe)
        out = self.final_layer(x[:, txt.shape[1]:], vec)  # (B, L_img, C_out)
        if self.config.prediction == "data":  # x_t = (1 - t) x + t noise, so v = noise - x = (x_t - x) / t
            t = timesteps.to(out.dtype).clamp(min=DATA_PREDICTION_MIN_T)[:, None, None]
            out = (img - out) / t
        return out


def build_mmdit(**config) -> MMDiT:
    """Build the MMDiT from upstream-style config keywords (on the current default device)."""
    cfg = MMDiTConfig.from_dict(config)
    return MMDiT(cfg)
