"""Training configs: nested dataclasses, named presets, JSON files and dotted command-line overrides.

`load_train_config("shapes-dit", ["model.hidden_size=256", "optim.lr=3e-4"])` starts from a named preset (or a JSON
file), applies `dotted.key=value` overrides (values parsed as JSON when they parse, else kept as strings) and
returns a validated `TrainConfig`. Dict-valued fields (`model`, `vae`, `condition_config`) accept new keys.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from pipelines.models.mmdit import MMDiTConfig
from pipelines.training.losses import LOW_T_MIN

STAGES = ("vae", "dit")

# The embedded default's architecture (see `train_default`); tiny variants keep tests fast.
SHAPES_VAE = dict(latent_channels=8, block_out_channels=[16, 32, 64], layers_per_block=1, norm_num_groups=8,
                  spatial_compression_ratio=4, time_compression_ratio=4, scale_factor=1.0, shift_factor=0.0)
# Patch 4 on the 16x16 latent: 16 tokens a frame, 144 for a 33-frame clip. A quarter of patch 2's tokens makes a
# CPU step ~4x cheaper, and for this world more steps beat finer tokens (the output layer still writes every
# latent pixel).
SHAPES_MMDIT = dict(in_channels=128, vec_in_dim=384, context_in_dim=384, hidden_size=192, num_heads=3,
                    axes_dim=[16, 24, 24], depth=2, depth_single_blocks=4, cond_embed=True, qkv_bias=True,
                    patch_size=4)
SHAPES_CONDITIONS = dict(t2v=3.0, i2v_head=2.0, i2v_tail=1.0, i2v_loop=1.0, v2v_head=1.0, v2v_tail=1.0)
TINY_VAE = dict(latent_channels=4, block_out_channels=[8, 8, 8], layers_per_block=1, norm_num_groups=4,
                spatial_compression_ratio=4, time_compression_ratio=4, scale_factor=1.0, shift_factor=0.0)
TINY_MMDIT = dict(in_channels=16, vec_in_dim=384, context_in_dim=384, hidden_size=32, num_heads=2,
                  axes_dim=[4, 6, 6], depth=1, depth_single_blocks=1, cond_embed=True, qkv_bias=True, patch_size=2)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    warmup_steps: int = 50
    cosine: bool = True  # cosine decay to min_lr over `steps` (else constant after warmup)
    min_lr: float = 1e-5
    grad_clip: float = 1.0
    accumulation_steps: int = 1
    ema_decay: float = 0.0  # 0 disables EMA; the decay is warmed up as min(decay, (1 + step) / (10 + step))


@dataclass
class DataConfig:
    size: int = 64  # frame size in pixels
    num_frames: int = 33  # short clips: t2v / i2v / loop (dit) or the VAE's clip length (vae)
    long_frames: int = 65  # v2v clips (dit)
    seed: int = 0
    loop_fraction: float = 0.1  # vae stage: share of loop clips
    pool_size: int = 64  # dit: pre-encoded ordinary clips
    loop_pool_size: int = 16  # dit: pre-encoded loop clips (for i2v_loop)
    long_pool_size: int = 16  # dit: pre-encoded long clips (for v2v)
    encode_batch: int = 8
    twin_pool_size: int = 0  # dit: shape twins encoded for the first this many ordinary clips (for shape_swap)
    pool_cache: str = ""  # dit: folder for encoded pools, reused by later runs on the same VAE ("" = none)
    vae_crop: int = 0  # vae stage: train on crops this big around the object (0: whole frames); 4x cheaper at 32,
    # but GroupNorm's statistics then differ from whole frames' (measured on whole frames: 16 dB after 1,000 steps
    # on crops against 20 dB after 400 on whole frames)


@dataclass
class TrainConfig:
    stage: str = "dit"
    outputs: str = "runs/train"
    model: dict = field(default_factory=lambda: dict(SHAPES_MMDIT))  # MMDiT config (dit stage)
    vae: dict = field(default_factory=lambda: dict(SHAPES_VAE))  # VAE config (trained in the vae stage)
    vae_weights: str | None = None  # dit stage: the trained VAE's safetensors
    mmdit_weights: str | None = None  # dit stage: start from these MMDiT weights (fresh optimizer and schedule)
    vae_latent_keep: list[int] = field(default_factory=list)  # vae stage: vae_weights has more latent channels
    # than `vae.latent_channels`: start from these of them (indices; `warm_start.narrow_vae_state`)
    mmdit_fresh_io: bool = False  # dit stage: mmdit_weights came from another latent space (VAE): keep the blocks,
    # initialise the image/condition embedders and output projection afresh (`warm_start.load_warm_start`)
    text_max_length: int = 32
    condition_config: dict = field(default_factory=lambda: dict(SHAPES_CONDITIONS))
    text_dropout: float = 0.1
    exclude_conditioned_loss: bool = True
    timestep_uniform: float = 0.0  # dit: share of t drawn like the sampler's steps (shifted uniform), not logit-normal
    timestep_low: float = 0.0  # dit: share of t drawn uniformly from [LOW_T_MIN, timestep_low_max] (low noise)
    timestep_low_max: float = 0.4
    shape_swap: float = 0.0  # dit: share of t2v samples whose caption and target are their clip's shape twin's
    shape_swap_min_t: float = 0.6  # dit: swapped samples draw t uniformly from [shape_swap_min_t, 1]
    batch_size: int = 8
    long_batch_size: int = 4  # dit: batch size of v2v (long clip) steps
    long_every: int = 4  # dit: every k-th step trains on long clips (0: never)
    image_every: int = 0  # dit: every k-th step (not a long one) trains text-to-image on first frames (0: never)
    image_batch_size: int = 64  # dit: batch size of those image steps (a frame is 16 tokens, a 33-frame clip 144)
    kl_weight: float = 1e-4  # vae: weight of the per-element mean KL
    mse_weight: float = 1.0  # vae: weight of the MSE term beside L1
    object_weight: float = 0.0  # extra loss weight on object pixels (vae) or on latents encoding them (dit)
    object_margin: int = 0  # the extra weight also covers background pixels this close to the object
    edge_weight: float = 0.0  # weight of an L1 loss on the error's spatial gradients, keeping outlines sharp: on
    # decoded pixels (vae), on the predicted velocity's latents (dit; object latents weighted as in the MSE)
    color_weight: float = 0.0  # vae: weight of an L1 loss on the object's mean colour per frame (`color_loss`)
    sample_posterior: bool = False  # vae: decode a posterior sample (True) or its mean (faster to learn)
    freeze_encoder: bool = False  # vae: fine-tune only the decoder (latents, and so a trained DiT, stay valid)
    denoise_with: str = ""  # vae (with freeze_encoder): a preset folder whose MMDiT re-samples each clip's latents
    # from noise level t0 ~ U[denoise_t]; the decoder also learns to decode those to the clip (`denoised_latents`)
    denoise_t: list[float] = field(default_factory=lambda: [0.05, 0.5])
    denoise_steps: int = 30  # the sampler's step count: the steps of its schedule below t0 are run
    denoise_guidance: float = 4.0  # text guidance of those steps
    steps: int = 100
    time_budget_min: float = 0.0  # > 0: fit the step count (and cosine length) to this wall time
    log_every: int = 10
    tensorboard: bool = False  # also write the logged loss/lr/pace as TensorBoard events to OUTPUTS/tensorboard
    ckpt_every: int = 100
    keep_n_latest: int = 2
    ckpt_background: bool = False  # write checkpoints in a thread while training goes on (CheckpointIO background)
    seed: int = 42
    threads: int = 2
    backend: str = "auto"  # "auto" (ddp under torchrun, else none), "none", "ddp", "fsdp", "colossalai-zero2", ...
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        for name in ("batch_size", "image_batch_size", "steps", "log_every", "ckpt_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.long_every < 0 or self.image_every < 0:
            raise ValueError(f"long_every and image_every count steps (0: never), got {self.long_every} and "
                             f"{self.image_every}")
        if self.optim.accumulation_steps < 1:
            raise ValueError(f"optim.accumulation_steps must be at least 1, got {self.optim.accumulation_steps}")
        if not 0.0 <= self.optim.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must lie in [0, 1), got {self.optim.ema_decay}")
        for name in ("timestep_uniform", "timestep_low", "shape_swap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not LOW_T_MIN < self.timestep_low_max <= 1.0:
            raise ValueError(f"timestep_low_max must lie in ({LOW_T_MIN}, 1], got {self.timestep_low_max}")
        if not 0.0 < self.shape_swap_min_t < 1.0:
            raise ValueError(f"shape_swap_min_t must lie in (0, 1), got {self.shape_swap_min_t}")
        if self.shape_swap and (self.data.twin_pool_size < 1 or self.stage != "dit"):
            raise ValueError("shape_swap trains the dit stage on shape twins: set data.twin_pool_size > 0")
        if self.edge_weight < 0 or self.color_weight < 0:
            raise ValueError(f"edge_weight and color_weight must not be negative, got {self.edge_weight} and "
                             f"{self.color_weight}")
        if self.object_weight < 0 or self.object_margin < 0:
            raise ValueError("object_weight and object_margin must not be negative, "
                             f"got {self.object_weight} and {self.object_margin}")
        if self.vae_latent_keep and len(self.vae_latent_keep) != self.vae.get("latent_channels"):
            raise ValueError(f"vae_latent_keep names {len(self.vae_latent_keep)} channels for a VAE with "
                             f"latent_channels={self.vae.get('latent_channels')}")
        if (self.stage == "dit" and self.model.get("prediction", MMDiTConfig.prediction) == "velocity"
                and self.model.get("in_channels", 0) > self.model.get("hidden_size", 0)):
            raise ValueError(
                f"model.in_channels={self.model.get('in_channels')} (latent channels x patch²) exceeds "
                f"model.hidden_size={self.model.get('hidden_size')}: a token cannot carry its own noise through the "
                "blocks, so the velocity's noise part is lost (the loss stalls high); use model.prediction=data, "
                "a smaller patch, fewer latent channels or a wider model")
        if self.denoise_with and (self.stage != "vae" or not self.freeze_encoder):
            raise ValueError("denoise_with fine-tunes the decoder alone: use stage=vae with freeze_encoder=true")
        if self.denoise_with and len(self.denoise_t) != 2:  # (the range itself: `SampledLatents`)
            raise ValueError(f"denoise_t must be [lo, hi], got {self.denoise_t}")
        if self.object_margin and not self.object_weight:
            raise ValueError("object_margin widens the object_weight region: set object_weight too")


PRESETS: dict[str, dict] = {
    # Object pixels weigh 21x: the object is ~5% of a frame, and at 5x (object_weight=4) a VAE still decoded red,
    # green and blue objects alike as brown after 3,300 steps; 1,239 fine-tuning steps at 21x took
    # `colour_fidelity` from 14 to 20 of the 22 colour/background pairs.
    "shapes-vae": dict(stage="vae", outputs="runs/shapes-vae", batch_size=8, steps=5000, kl_weight=1e-4,
                       object_weight=20.0, log_every=10, ckpt_every=200,
                       optim=dict(lr=1e-3, warmup_steps=20, min_lr=2e-5), data=dict(num_frames=9, vae_crop=0)),
    # Whole 33-frame clips: a VAE trained on 9-frame clips decoded frames 16-32 of a 33-frame clip at 25.5-26 dB
    # against 28.3-31 dB for the same frames as a 9-frame clip of their own (GroupNorm statistics span the clip
    # and the mid-block attention sees every earlier frame), and the studio decodes 33-65 frames.
    "shapes-decoder": dict(stage="vae", outputs="runs/shapes-decoder", batch_size=2, steps=5000, log_every=10,
                           ckpt_every=200, freeze_encoder=True, object_weight=20.0, object_margin=2,
                           optim=dict(lr=5e-4, warmup_steps=10, min_lr=2e-5), data=dict(num_frames=33, vae_crop=0)),
    "shapes-dit": dict(stage="dit", outputs="runs/shapes-dit", batch_size=16, long_batch_size=8, steps=20000,
                       log_every=10, ckpt_every=100,
                       optim=dict(lr=8e-4, warmup_steps=30, ema_decay=0.995),
                       data=dict(pool_size=2048, loop_pool_size=256, long_pool_size=384)),
    "tiny-vae": dict(stage="vae", outputs="runs/tiny-vae", vae=TINY_VAE, batch_size=2, steps=3, log_every=1,
                     data=dict(size=32, num_frames=5)),
    "tiny-dit": dict(stage="dit", outputs="runs/tiny-dit", vae=TINY_VAE, model=TINY_MMDIT, batch_size=2,
                     long_batch_size=2, long_every=2, steps=3, log_every=1, optim=dict(ema_decay=0.9),
                     data=dict(size=32, num_frames=9, long_frames=37, pool_size=4, loop_pool_size=2,
                               long_pool_size=2, encode_batch=4)),
}


def parse_value(text: str):
    """JSON when it parses (numbers, true/false/null, lists, dicts), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Return a copy of `config` with each `dotted.key=value` applied."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form dotted.key=value")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = parse_value(raw)
    return config


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown {where} fields: {sorted(unknown)}")
    kwargs = {}
    for name, value in values.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        if is_dataclass(default):
            kwargs[name] = _build(type(default), {**asdict(default), **value}, f"{where}{name}.")
        elif name == "betas":
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(values: dict) -> TrainConfig:
    """Validated TrainConfig from a (possibly partial) nested dict."""
    return _build(TrainConfig, values, "")


def load_train_config(spec: str, overrides: list[str] | None = None) -> TrainConfig:
    """A preset name or a JSON file path, plus dotted overrides."""
    if spec in PRESETS:
        base = copy.deepcopy(PRESETS[spec])
    elif Path(spec).is_file():
        base = json.loads(Path(spec).read_text(encoding="utf-8"))
    else:
        raise ValueError(f"config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    # Expand to the full config first, so `model.hidden_size=256` edits the preset's model instead of replacing it.
    full = config_to_dict(config_from_dict(base))
    return config_from_dict(apply_overrides(full, overrides or []))


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(asdict(cfg)))
