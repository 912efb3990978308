"""Building blocks of the causal video VAE: causal convs, resnets, resamplers, frame-causal mid-block attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class CausalConv3d(nn.Module):
    """3D conv that pads time only with (replicated) past frames, so frame t never sees frame t + 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride=1):
        super().__init__()
        k = kernel_size
        self.padding = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)  # (W left/right, H top/bottom, T front/back)
        self.conv = nn.Conv3d(in_channels, out_channels, k, stride=stride)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T, H, W)
        return self.conv(F.pad(x, self.padding, mode="replicate"))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int, stride: tuple[int, int, int]):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride)

    def forward(self, x: Tensor) -> Tensor:  # T -> (T - 1) // s_t + 1
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling; the first frame is only upsampled in space, so T -> s_t * (T - 1) + 1."""

    def __init__(self, channels: int, factor: tuple[int, int, int]):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T, H, W)
        first, rest = x[:, :, :1], x[:, :, 1:]
        first = F.interpolate(first.squeeze(2), scale_factor=self.factor[1:], mode="nearest").unsqueeze(2)
        if rest.shape[2] > 0:
            rest = F.interpolate(rest, scale_factor=self.factor, mode="nearest")
            x = torch.cat([first, rest], dim=2)
        else:
            x = first
        return self.conv(x)


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, stride, dropout: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups,
                                                 dropout) for i in range(num_layers))
        self.downsamplers = nn.ModuleList([Downsample(out_channels, stride)]) if stride else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, factor, dropout: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups,
                                                 dropout) for i in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample(out_channels, factor)]) if factor else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class FrameCausalAttention(nn.Module):
    """Single-head self-attention over all (t, h, w) tokens where a token sees every token of frames <= its own.

    Computed frame by frame against the growing key prefix, which equals the masked attention without ever
    materialising an L x L mask (33 latent frames at 256px would need gigabytes for it).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T, H, W)
        b, c, t, h, w = x.shape
        tokens = rearrange(self.group_norm(x), "b c t h w -> b (t h w) c")
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, L, C)
        per_frame = h * w
        out = torch.cat([
            F.scaled_dot_product_attention(q[:, :, f * per_frame:(f + 1) * per_frame], k[:, :, :(f + 1) * per_frame],
                                           v[:, :, :(f + 1) * per_frame])
            for f in range(t)], dim=2)  # (B, 1, L, C)
        out = self.to_out[0](out[:, 0])
        return x + rearrange(out, "b (t h w) c -> b c t h w", t=t, h=h, w=w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool, dropout: float):
        super().__init__()
        self.attentions = nn.ModuleList([FrameCausalAttention(channels, groups) if add_attention else nn.Identity()])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, dropout),
                                      ResnetBlock(channels, channels, groups, dropout)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


def blend_v(a: Tensor, b: Tensor, extent: int) -> Tensor:
    """Linearly cross-fade the bottom rows of tile a into the top rows of tile b (along H)."""
    extent = min(a.shape[-2], b.shape[-2], extent)
    if extent == 0:
        return b
    w = torch.arange(extent, device=b.device, dtype=b.dtype)[:, None] / extent  # (extent, 1)
    b = b.clone()
    b[..., :extent, :] = a[..., -extent:, :] * (1 - w) + b[..., :extent, :] * w
    return b


def blend_h(a: Tensor, b: Tensor, extent: int) -> Tensor:
    """Cross-fade along W."""
    extent = min(a.shape[-1], b.shape[-1], extent)
    if extent == 0:
        return b
    w = torch.arange(extent, device=b.device, dtype=b.dtype) / extent  # (extent,)
    b = b.clone()
    b[..., :extent] = a[..., -extent:] * (1 - w) + b[..., :extent] * w
    return b


def blend_t(a: Tensor, b: Tensor, extent: int) -> Tensor:
    """Cross-fade along T (dim 2)."""
    extent = min(a.shape[2], b.shape[2], extent)
    if extent == 0:
        return b
    w = (torch.arange(extent, device=b.device, dtype=b.dtype) / extent)[:, None, None]  # (extent, 1, 1)
    b = b.clone()
    b[:, :, :extent] = a[:, :, -extent:] * (1 - w) + b[:, :, :extent] * w
    return b
