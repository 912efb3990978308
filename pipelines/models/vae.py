"""Causal 3D video VAE with the HunyuanVideo architecture (as used by Open-Sora 2.0).

Written from the architecture description in the Open-Sora / HunyuanVideo sources; parameter names follow
`hunyuan_vae.safetensors`. Causal in time: convolutions pad only past frames, and the mid-block attention lets a
token see its own and earlier frames. So an image is one latent frame and T frames map to (T - 1) / 4 + 1 latents.
The VAE owns its latent scaling: `encode` returns scale * (z - shift), `decode` undoes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.models.config import UpstreamConfig
from pipelines.models.vae_blocks import (CausalConv3d, DownBlock, MidBlock, UpBlock, blend_h, blend_t, blend_v)

@dataclass(frozen=True)
class CausalVAEConfig(UpstreamConfig):
    KIND = "causal VAE"

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scale_factor: float = 0.476986
    shift_factor: float = 0.0
    time_compression_ratio: int = 4
    spatial_compression_ratio: int = 8
    mid_block_add_attention: bool = True
    sample_size: int = 256  # spatial tile size in pixels
    sample_tsize: int = 64  # temporal tile size in frames
    tile_overlap_factor: float = 0.25
    use_spatial_tiling: bool = False
    use_temporal_tiling: bool = False
    use_slicing: bool = False
    dropout: float = 0.0
    channel: bool = False  # upstream flag with no effect on this architecture; accepted for config parity

    def __post_init__(self):
        if self.act_fn != "silu":
            raise ValueError(f"only act_fn='silu' is supported, got {self.act_fn!r}")
        if self.time_compression_ratio != 4:
            raise ValueError("the causal VAE supports time_compression_ratio=4 only")
        n_down = len(self.block_out_channels) - 1
        if 2**n_down < self.spatial_compression_ratio:
            raise ValueError("not enough blocks for the requested spatial compression")

    @property
    def tile_latent_size(self) -> int:
        return self.sample_size // 2 ** (len(self.block_out_channels) - 1)

    @property
    def tile_latent_tsize(self) -> int:
        return self.sample_tsize // self.time_compression_ratio


def block_strides(cfg: CausalVAEConfig) -> list[tuple[int, int, int] | None]:
    """(t, h, w) down/up-sampling factor of each encoder block (the decoder mirrors it), None for no resampling."""
    n = len(cfg.block_out_channels)
    n_space = int(math.log2(cfg.spatial_compression_ratio))
    n_time = int(math.log2(cfg.time_compression_ratio))
    strides = []
    for i in range(n):
        space = i < n_space
        time = i >= n - 1 - n_time and i != n - 1
        strides.append((2 if time else 1, 2 if space else 1, 2 if space else 1) if (space or time) else None)
    return strides


class Encoder(nn.Module):
    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.in_channels, chans[0], 3)
        self.down_blocks = nn.ModuleList()
        for i, stride in enumerate(block_strides(cfg)):
            self.down_blocks.append(DownBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, groups, stride,
                                              cfg.dropout))
        self.mid_block = MidBlock(chans[-1], groups, cfg.mid_block_add_attention, cfg.dropout)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=1e-6)
        self.conv_out = CausalConv3d(chans[-1], 2 * cfg.latent_channels, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T, H, W) -> (B, 2 * C_lat, T_lat, H/8, W/8)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        chans, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.latent_channels, chans[0], 3)
        self.up_blocks = nn.ModuleList()
        # The decoder's up-sampling factors follow the same rule as the encoder's down-sampling ones, block by block.
        for i, stride in enumerate(block_strides(cfg)):
            self.up_blocks.append(UpBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block + 1, groups, stride,
                                          cfg.dropout))
        self.mid_block = MidBlock(chans[0], groups, cfg.mid_block_add_attention, cfg.dropout)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=1e-6)
        self.conv_out = CausalConv3d(chans[-1], cfg.out_channels, 3)

    def forward(self, z: Tensor) -> Tensor:  # (B, C_lat, T_lat, h, w) -> (B, C, T, H, W)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


@dataclass
class DiagonalGaussian:
    mean: Tensor
    logvar: Tensor  # clamped to [-30, 20]

    @classmethod
    def from_moments(cls, moments: Tensor) -> "DiagonalGaussian":
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + torch.exp(0.5 * self.logvar) * noise.to(self.mean.device)

    def kl(self) -> Tensor:
        """KL to a standard normal, summed over all but the batch dim."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class CausalVAE(nn.Module):
    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(cfg.latent_channels, cfg.latent_channels, 1)

    # ---- sizes -------------------------------------------------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.config.time_compression_ratio + 1

    def video_frames(self, latent_frames: int) -> int:
        return self.config.time_compression_ratio * (latent_frames - 1) + 1

    def get_latent_size(self, size: tuple[int, int, int]) -> tuple[int, int, int]:
        t, h, w = size
        s = self.config.spatial_compression_ratio
        return self.latent_frames(t), (h - 1) // s + 1, (w - 1) // s + 1

    # ---- encode ------------------------------------------------------------------------------------------------
    def encode_moments(self, x: Tensor) -> Tensor:
        """(B, C, T, H, W) in [-1, 1] -> raw posterior moments (B, 2 * C_lat, T_lat, h, w), tiled when large."""
        cfg = self.config
        if cfg.use_slicing and x.shape[0] > 1:
            return torch.cat([self.encode_moments(xi) for xi in x.split(1)], dim=0)
        if cfg.use_temporal_tiling and x.shape[2] > cfg.sample_tsize:
            return self._temporal_tiled_moments(x)
        return self._spatial_moments(x)

    def _spatial_moments(self, x: Tensor) -> Tensor:
        cfg = self.config
        if cfg.use_spatial_tiling and max(x.shape[-2:]) > cfg.sample_size:
            return self._spatial_tiled_moments(x)
        return self.quant_conv(self.encoder(x))

    def _spatial_tiled_moments(self, x: Tensor) -> Tensor:
        cfg = self.config
        stride = int(cfg.sample_size * (1 - cfg.tile_overlap_factor))
        blend = int(cfg.tile_latent_size * cfg.tile_overlap_factor)
        keep = cfg.tile_latent_size - blend
        rows = [[self.quant_conv(self.encoder(x[..., i:i + cfg.sample_size, j:j + cfg.sample_size]))
                 for j in range(0, x.shape[-1], stride)] for i in range(0, x.shape[-2], stride)]
        return _stitch_tiles(rows, blend, keep)

    def _temporal_tiled_moments(self, x: Tensor) -> Tensor:
        cfg = self.config
        stride = int(cfg.sample_tsize * (1 - cfg.tile_overlap_factor))
        blend = int(cfg.tile_latent_tsize * cfg.tile_overlap_factor)
        tiles = []
        for i in range(0, x.shape[2], stride):
            tile = self._spatial_moments(x[:, :, i:i + cfg.sample_tsize + 1])
            tiles.append(tile if i == 0 else tile[:, :, 1:])  # a later tile's first latent repeats the seam frame
        return _stitch_time(tiles, blend, cfg.tile_latent_tsize - blend)

    def encode(self, x: Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None,
               return_posterior: bool = False):
        """Video (B, C, T, H, W) in [-1, 1] -> scaled latent (B, C_lat, T_lat, H/8, W/8).

        Deterministic (posterior mean) by default: references should not add randomness the seed does not control.
        """
        posterior = DiagonalGaussian.from_moments(self.encode_moments(x))
        z = self.scale_latent(posterior.sample(generator) if sample_posterior else posterior.mean)
        return (z, posterior) if return_posterior else z

    def scale_latent(self, z: Tensor) -> Tensor:
        """Raw posterior latent -> the scaled latent the MMDiT sees (what `encode` returns)."""
        return self.config.scale_factor * (z - self.config.shift_factor)

    # ---- decode ------------------------------------------------------------------------------------------------
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent (B, C_lat, T_lat, h, w) -> video (B, C, 4 (T_lat - 1) + 1, 8h, 8w), roughly in [-1, 1]."""
        cfg = self.config
        z = z / cfg.scale_factor + cfg.shift_factor
        if cfg.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode_unscaled(zi) for zi in z.split(1)], dim=0)
        return self._decode_unscaled(z)

    def _decode_unscaled(self, z: Tensor) -> Tensor:
        cfg = self.config
        if cfg.use_temporal_tiling and z.shape[2] > cfg.tile_latent_tsize:
            stride = int(cfg.tile_latent_tsize * (1 - cfg.tile_overlap_factor))
            blend = int(cfg.sample_tsize * cfg.tile_overlap_factor)
            tiles = []
            for i in range(0, z.shape[2], stride):
                tile = self._spatial_decode(z[:, :, i:i + cfg.tile_latent_tsize + 1])
                tiles.append(tile if i == 0 else tile[:, :, 1:])
            return _stitch_time(tiles, blend, cfg.sample_tsize - blend)
        return self._spatial_decode(z)

    def _spatial_decode(self, z: Tensor) -> Tensor:
        cfg = self.config
        size = cfg.tile_latent_size
        if not (cfg.use_spatial_tiling and max(z.shape[-2:]) > size):
            return self.decoder(self.post_quant_conv(z))
        stride = int(size * (1 - cfg.tile_overlap_factor))
        blend = int(cfg.sample_size * cfg.tile_overlap_factor)
        rows = [[self.decoder(self.post_quant_conv(z[..., i:i + size, j:j + size]))
                 for j in range(0, z.shape[-1], stride)] for i in range(0, z.shape[-2], stride)]
        return _stitch_tiles(rows, blend, cfg.sample_size - blend)

    def forward(self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None):
        """Training pass: returns (reconstruction, posterior)."""
        z, posterior = self.encode(x, sample_posterior=sample_posterior, generator=generator, return_posterior=True)
        return self.decode(z), posterior


def _stitch_tiles(rows: list[list[Tensor]], blend: int, keep: int) -> Tensor:
    """Blend each tile into its top and left neighbours over `blend` pixels, keep `keep`, and concatenate."""
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = blend_v(rows[i - 1][j], tile, blend)
            if j > 0:
                tile = blend_h(row[j - 1], tile, blend)
            row[j] = tile  # as upstream, which blends in place: the tiles below and right read the blended one
            kept.append(tile[..., :keep, :keep])
        out_rows.append(torch.cat(kept, dim=-1))
    return torch.cat(out_rows, dim=-2)


def _stitch_time(tiles: list[Tensor], blend: int, keep: int) -> Tensor:
    """Blend each temporal tile into its predecessor; the first tile keeps one extra (causal) frame."""
    out, prev = [tiles[0][:, :, :keep + 1]], tiles[0]
    for tile in tiles[1:]:
        prev = blend_t(prev, tile, blend)  # as upstream (in place): the next tile reads this blended one
        out.append(prev[:, :, :keep])
    return torch.cat(out, dim=2)


def build_causal_vae(**config) -> CausalVAE:
    """Build the causal VAE from upstream-style config keywords (`vae_C.json` names)."""
    return CausalVAE(CausalVAEConfig.from_dict(config))


__all__ = ["CausalVAE", "CausalVAEConfig", "DiagonalGaussian", "build_causal_vae"]
