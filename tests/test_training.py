"""Training pieces: reference conditions, flow-matching losses, and train.py end to end (tiny configs)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from pipelines.models.vae import CausalVAE, CausalVAEConfig
from pipelines.sampling import get_schedule, shift_alpha_for, time_shift
from pipelines.training.conditions import (allowed_condition_types, build_condition, conditioned_frame_mask,
                                           draw_condition_types, encode_references, prepare_visual_condition_causal)
from pipelines.training.losses import (dropout_condition, flow_interpolate, flow_noise_for, flow_target,
                                       get_batch_loss, sample_timesteps)
from pipelines.training.train_config import TINY_VAE, load_train_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_vae() -> CausalVAE:
    torch.manual_seed(0)
    # A non-trivial scale and shift, so a test can tell the real (scaled) encode from the bare encoder.
    return CausalVAE(CausalVAEConfig.from_dict({**TINY_VAE, "scale_factor": 1.7, "shift_factor": 0.3})).eval()


def real_encode(vae: CausalVAE, x: torch.Tensor) -> torch.Tensor:
    """scale * (posterior mean - shift), spelled out from the raw moments."""
    mean = vae.encode_moments(x).chunk(2, dim=1)[0]
    return vae.config.scale_factor * (mean - vae.config.shift_factor)


# ---- conditions -----------------------------------------------------------------------------------------------------

def test_condition_masks_mark_the_given_frames_with_real_encoded_references(tiny_vae):
    x = torch.rand(1, 3, 37, 32, 32) * 2 - 1  # 37 frames -> 10 latent frames, enough for v2v
    x0 = tiny_vae.encode(x)
    refs = encode_references(x, tiny_vae)
    expected = {"t2v": [], "i2v_head": [0], "i2v_tail": [9], "i2v_loop": [0, 9], "v2v_head": list(range(9)),
                "v2v_tail": list(range(1, 10))}
    with torch.no_grad():
        head_img, tail_img = real_encode(tiny_vae, x[:, :, :1]), real_encode(tiny_vae, x[:, :, -1:])
        head_vid, tail_vid = real_encode(tiny_vae, x[:, :, :33]), real_encode(tiny_vae, x[:, :, -33:])
    for cond_type, frames in expected.items():
        cond = build_condition(x0, [cond_type], refs)  # (1, 1 + C, 10, h, w)
        assert cond.shape == (1, 1 + x0.shape[1], *x0.shape[2:])
        assert conditioned_frame_mask(cond)[0].nonzero().flatten().tolist() == frames, cond_type
        latent = cond[:, 1:]
        unmasked = [t for t in range(10) if t not in frames]
        assert latent[:, :, unmasked].abs().max() == 0
    cond = build_condition(x0, ["i2v_loop"], refs)
    torch.testing.assert_close(cond[:, 1:, :1], head_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond[:, 1:, -1:], tail_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(build_condition(x0, ["v2v_head"], refs)[:, 1:, :9], head_vid, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(build_condition(x0, ["v2v_tail"], refs)[:, 1:, 1:], tail_vid, atol=1e-5, rtol=1e-5)


def test_v2v_types_are_dropped_for_short_clips():
    config = {"t2v": 1.0, "v2v_head": 1.0, "v2v_tail_easy": 1.0}
    assert allowed_condition_types(config, 9) == {"t2v": 1.0}
    assert allowed_condition_types(config, 17) == {"t2v": 1.0, "v2v_head": 1.0}
    assert set(allowed_condition_types(config, 18)) == set(config)
    drawn = draw_condition_types(config, 9, 200, torch.Generator().manual_seed(0))
    assert set(drawn) == {"t2v"}
    with pytest.raises(ValueError, match="no condition type"):
        allowed_condition_types({"v2v_head": 1.0}, 9)
    with pytest.raises(ValueError, match="unknown condition"):
        allowed_condition_types({"i2v_middle": 1.0}, 9)


def test_prepare_visual_condition_encodes_with_the_scaled_vae_encode(tiny_vae):
    x = torch.rand(3, 3, 9, 32, 32) * 2 - 1
    x0, cond, types = prepare_visual_condition_causal(x, {"i2v_head": 1.0}, tiny_vae, torch.Generator())
    assert types == ["i2v_head"] * 3
    with torch.no_grad():
        torch.testing.assert_close(x0, real_encode(tiny_vae, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cond[:, 1:, :1], real_encode(tiny_vae, x[:, :, :1]), atol=1e-5, rtol=1e-5)
        bare = tiny_vae.encoder(x[:, :, :1])[:, : x0.shape[1]]  # upstream's bug: bare encoder, no quant/scale
    assert not torch.allclose(cond[:, 1:, :1], bare, atol=1e-3)
    assert cond[:, 0, 0].min() == 1 and cond[:, 0, 1:].max() == 0


# ---- losses ---------------------------------------------------------------------------------------------------

def test_timesteps_lie_in_the_open_interval_and_are_shifted():
    t = sample_timesteps(4096, 64, 9, torch.Generator().manual_seed(1))
    assert 0 < t.min() and t.max() < 1
    plain = torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(t, time_shift(shift_alpha_for(64, 9), plain))
    assert t.mean() > plain.mean() + 0.05  # alpha > 1 moves mass towards noise


def test_timesteps_uniform_share_follows_the_sampling_schedule():
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    torch.testing.assert_close(sample_timesteps(512, 16, 9, generator(), uniform_share=0.0),
                               sample_timesteps(512, 16, 9, generator()))  # off: the same stream as before
    alpha = shift_alpha_for(16, 9)
    steps = torch.tensor(get_schedule(30, 16, 9)[:-1])
    everyone = sample_timesteps(200_000, 16, 9, generator(), uniform_share=1.0)
    assert 0 < everyone.min() and everyone.max() < 1
    for level in (0.5, 0.9, 0.987):  # all uniform: as often above a level as the sampler's steps are
        share = (everyone > level).float().mean().item()
        exact = 1 - (level / (alpha - (alpha - 1) * level))  # P(shift(u) > level), u uniform
        assert abs(share - exact) < 0.01
        assert abs(share - (steps > level).float().mean().item()) < 0.04
    plain = sample_timesteps(200_000, 16, 9, generator())
    half = sample_timesteps(200_000, 16, 9, generator(), uniform_share=0.5)
    assert (plain > 0.987).float().mean() < 0.002 and (half > 0.987).float().mean() > 0.01
    with pytest.raises(ValueError, match="uniform_share"):
        sample_timesteps(4, 16, 9, uniform_share=1.5)


def test_timesteps_low_share_draws_the_low_noise_levels():
    generator = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    torch.testing.assert_close(sample_timesteps(512, 16, 9, generator(), uniform_share=0.5, low_share=0.0),
                               sample_timesteps(512, 16, 9, generator(), uniform_share=0.5))  # off: unchanged
    everyone = sample_timesteps(100_000, 16, 9, generator(), low_share=1.0, low_max=0.3)
    assert everyone.min() >= 0.02 and everyone.max() <= 0.3
    assert abs((everyone < 0.16).float().mean().item() - 0.5) < 0.01  # uniform over [0.02, 0.3]
    plain = (sample_timesteps(100_000, 16, 9, generator()) < 0.3).float().mean().item()
    quarter = (sample_timesteps(100_000, 16, 9, generator(), low_share=0.25, low_max=0.3) < 0.3).float().mean().item()
    assert plain < 0.1 and abs(quarter - (0.25 + 0.75 * plain)) < 0.01
    with pytest.raises(ValueError, match="low_share"):
        sample_timesteps(4, 16, 9, low_share=-0.1)
    with pytest.raises(ValueError, match="low_max"):
        sample_timesteps(4, 16, 9, low_share=0.5, low_max=0.01)
    with pytest.raises(ValueError, match="timestep_low_max"):
        load_train_config("tiny-dit", ["timestep_low=0.2", "timestep_low_max=1.5"])


def test_flow_interpolation_and_target_follow_the_formula():
    x0, x1 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    sigma = 1e-5
    torch.testing.assert_close(flow_interpolate(x0, x1, torch.zeros(2), sigma), x0 + sigma * x1)
    torch.testing.assert_close(flow_interpolate(x0, x1, torch.ones(2), sigma), x1)
    t = torch.tensor([0.3, 0.8])
    manual = (1 - t)[:, None, None] * x0 + (1 - (1 - sigma) * (1 - t))[:, None, None] * x1
    torch.testing.assert_close(flow_interpolate(x0, x1, t, sigma), manual)
    h = 1e-3  # the target is the time derivative of the path
    slope = (flow_interpolate(x0, x1, t + h, sigma) - flow_interpolate(x0, x1, t, sigma)) / h
    torch.testing.assert_close(slope, flow_target(x0, x1, sigma), atol=1e-3, rtol=1e-3)


def test_flow_noise_for_puts_another_clean_latent_on_the_same_path_point():
    x0, other, x1 = torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    t = torch.tensor([0.2, 0.6, 0.95])
    x_t = flow_interpolate(x0, x1, t)
    noise = flow_noise_for(x_t, other, t)
    torch.testing.assert_close(flow_interpolate(other, noise, t), x_t)  # the path through x_t that ends at `other`
    torch.testing.assert_close(flow_noise_for(x_t, x0, t), x1)  # and for x0 itself, its own noise
    # one Euler step along the target velocity from x_t to t = 0 lands on `other`
    torch.testing.assert_close(x_t - t[:, None, None] * flow_target(other, noise), other, atol=1e-4, rtol=1e-4)


def test_dropout_replaces_whole_samples_with_the_null_prompt():
    txt, y = torch.randn(64, 4, 3), torch.randn(64, 5)
    null_txt, null_y = torch.zeros(1, 4, 3), torch.zeros(1, 5)
    out, out_y, dropped = dropout_condition(0.5, txt, null_txt, torch.Generator().manual_seed(0), y, null_y)
    assert 0 < dropped.sum() < 64
    for i in range(64):
        source_txt, source_y = (null_txt[0], null_y[0]) if dropped[i] else (txt[i], y[i])
        assert torch.equal(out[i], source_txt) and torch.equal(out_y[i], source_y)
    assert torch.equal(dropout_condition(0.0, txt, null_txt)[0], txt)
    assert dropout_condition(1.0, txt, null_txt)[0].abs().max() == 0


def test_batch_loss_excludes_exactly_the_conditioned_frames():
    pred, target = torch.randn(2, 3 * 4, 6), torch.randn(2, 3 * 4, 6)  # 3 latent frames of 4 tokens
    masks = torch.tensor([[True, False, False], [False, False, True]])  # head given / tail given
    err = (pred - target).pow(2).mean(-1)  # (2, 12)
    manual = torch.cat([err[0, 4:], err[1, :8]]).mean()
    torch.testing.assert_close(get_batch_loss(pred, target, masks), manual)
    torch.testing.assert_close(get_batch_loss(pred, target, masks, exclude_conditioned=False), err.mean())
    torch.testing.assert_close(get_batch_loss(pred, target), err.mean())
    changed = pred.clone()
    changed[0, :4] += 100.0  # errors on a conditioned frame do not count
    torch.testing.assert_close(get_batch_loss(changed, target, masks), manual)


def test_batch_loss_weights_make_a_weighted_mean_that_keeps_its_scale():
    pred, target = torch.randn(2, 3 * 4, 6), torch.randn(2, 3 * 4, 6)
    masks = torch.tensor([[True, False, False], [False, False, False]])
    sq = (pred - target).pow(2)
    torch.testing.assert_close(get_batch_loss(pred, target, masks, weights=torch.ones_like(pred)),
                               get_batch_loss(pred, target, masks))  # uniform weights: the plain loss
    weights = torch.ones_like(pred)
    weights[1, 5] = 11.0  # one token of sample 1 weighs 11x
    weights[0, 0] = 50.0  # on a conditioned frame: excluded all the same
    keep = torch.ones(2, 12)
    keep[0, :4] = 0
    manual = (sq * weights * keep[..., None]).sum() / (weights * keep[..., None]).sum()
    torch.testing.assert_close(get_batch_loss(pred, target, masks, weights=weights), manual)
    heavy, plain = target.clone(), target.clone()
    heavy[1, 5] += 1.0  # the same error costs 11x more on the heavy token than on a plain one
    plain[1, 6] += 1.0
    torch.testing.assert_close(get_batch_loss(heavy, target, weights=weights),
                               11 * get_batch_loss(plain, target, weights=weights))
    with pytest.raises(ValueError, match="weights"):
        get_batch_loss(pred, target, weights=torch.ones(2, 12))


def test_latent_object_map_follows_the_causal_vae_grid():
    from pipelines.training.latent_pool import latent_object_map

    on_object = torch.zeros(1, 1, 9, 16, 16)
    on_object[0, 0, 0, 1, 1] = 1  # frame 0 -> latent frame 0 (alone)
    on_object[0, 0, 5, 9, 14] = 1  # frame 5 -> latent frame 2 (frames 5..8)
    got = latent_object_map(on_object, time_ratio=4, space_ratio=4)  # (1, 3, 4, 4)
    expected = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    expected[0, 0, 0, 0] = expected[0, 2, 2, 3] = True
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="latent grid"):
        latent_object_map(torch.zeros(1, 1, 8, 16, 16), 4, 4)


def test_dit_object_weight_weighs_the_latents_that_encode_the_object(tmp_path, monkeypatch):
    from pipelines.sampling import pack
    from pipelines.training import train
    from pipelines.training.train import DiTStage

    stage = DiTStage(load_train_config("tiny-dit", [f"outputs={tmp_path}", "object_weight=3", "object_margin=1"]))
    clips = stage.pool.short
    assert clips.objects.shape == (len(clips), *clips.x0.shape[2:]) and clips.objects.dtype == torch.bool
    assert clips.objects.any(dim=(2, 3)).all()  # every latent frame of every clip shows the object
    assert not clips.objects.all(dim=(2, 3)).any()  # ...and never fills it
    patch = stage.cfg.model["patch_size"]
    weights = stage.latent_weights(clips.objects[:2], clips.x0.shape[1], patch)
    expected = pack((1 + 3 * clips.objects[:2].float())[:, None].expand(-1, clips.x0.shape[1], -1, -1, -1), patch)
    assert torch.equal(weights, expected) and set(weights.unique().tolist()) == {1.0, 4.0}
    seen = []

    def spy(pred, target, masks, exclude, weights):
        seen.append(weights)
        return get_batch_loss(pred, target, masks, exclude, weights)

    monkeypatch.setattr(train, "get_batch_loss", spy)
    model = stage.build_model()
    weighted = stage.loss(model, 2, torch.Generator().manual_seed(0), step=0)
    assert torch.isfinite(weighted) and seen[-1] is not None and set(seen[-1].unique().tolist()) <= {1.0, 4.0}
    stage.cfg.object_weight = 0.0
    plain = stage.loss(model, 2, torch.Generator().manual_seed(0), step=0)  # the same batch, noise and t
    assert seen[-1] is None and not torch.allclose(weighted, plain)
    shares = []

    def timesteps(*args, uniform_share=0.0, **kwargs):
        shares.append(uniform_share)
        return sample_timesteps(*args, uniform_share=uniform_share, **kwargs)

    monkeypatch.setattr(train, "sample_timesteps", timesteps)
    stage.cfg.timestep_uniform = 0.5
    assert torch.isfinite(stage.loss(model, 2, torch.Generator().manual_seed(0), step=0)) and shares == [0.5]


def test_image_steps_train_text_to_image_on_first_latent_frames(tmp_path, monkeypatch):
    from pipelines.training import train
    from pipelines.training.train import DiTStage

    stage = DiTStage(load_train_config("tiny-dit", [f"outputs={tmp_path}", "image_every=2", "long_every=4",
                                                     "image_batch_size=5"]))
    assert [stage.is_image_step(s) for s in range(8)] == [True, False, True, False, True, False, True, False]
    assert [stage.is_long_step(s) for s in range(8)] == [False, False, False, True] * 2  # long steps keep theirs
    clips = stage.pool.short
    batch = stage.pool.sample_images(5, torch.Generator().manual_seed(0))
    assert batch.x0.shape == (5, clips.x0.shape[1], 1, *clips.x0.shape[3:]) and batch.cond_types == ["t2v"] * 5
    assert batch.objects.shape == (5, 1, *clips.objects.shape[2:])
    for x0, caption in zip(batch.x0, batch.captions):  # each is a pool clip's own first latent frame and caption
        index = next(i for i in range(len(clips)) if torch.equal(clips.x0[i, :, :1], x0))
        assert caption in (clips.captions[index], clips.prompts[index])
    seen = []

    def timesteps(batch, image_seq_len, t_lat, *args, **kwargs):
        seen.append((batch, t_lat))
        return sample_timesteps(batch, image_seq_len, t_lat, *args, **kwargs)

    monkeypatch.setattr(train, "sample_timesteps", timesteps)
    model = stage.build_model()
    assert torch.isfinite(stage.loss(model, 2, torch.Generator().manual_seed(0), step=0))
    assert torch.isfinite(stage.loss(model, 2, torch.Generator().manual_seed(0), step=1))
    # noise levels are shifted as for the clips the frames come from, whose first frame they teach
    assert seen == [(5, clips.x0.shape[2]), (2, clips.x0.shape[2])]
    with pytest.raises(ValueError, match="image_every"):
        load_train_config("tiny-dit", ["image_every=-1"])


def test_shape_swaps_give_t2v_samples_their_twin_caption_and_target(tmp_path):
    from pipelines.training.train import DiTStage

    stage = DiTStage(load_train_config("tiny-dit", [f"outputs={tmp_path}", "data.twin_pool_size=3",
                                                     "shape_swap=1.0"]))
    pool, twins = stage.pool.short, stage.pool.twins
    assert len(twins) == 3 and twins.x0.shape[1:] == pool.x0.shape[1:] and not twins.refs
    for i in range(3):  # the twin of clip i is clip i with another shape: another caption, other latents
        assert twins.captions[i] != pool.captions[i] and not torch.equal(twins.x0[i], pool.x0[i])
    plain = stage.pool.sample(32, False, torch.Generator().manual_seed(0))  # the same draws, before any swap
    generator = torch.Generator().manual_seed(0)
    batch = stage.pool.sample(32, False, generator, swap_share=1.0)
    assert batch.swapped.any() and not batch.swapped.all() and torch.equal(plain.x0, batch.x0)
    for row in range(32):
        index = next((i for i in range(len(pool)) if torch.equal(pool.x0[i], batch.x0[row])), None)
        if batch.swapped[row]:  # only t2v clips with a twin; noisy input from the clip, target and caption twin's
            assert batch.cond_types[row] == "t2v" and index < 3
            assert torch.equal(batch.target_x0[row], twins.x0[index])
            assert batch.captions[row] in (twins.captions[index], twins.prompts[index])
            # in the suffix format the clip's own caption was drawn in (training or inference)
            assert (batch.captions[row] == twins.prompts[index]) == (plain.captions[row] == pool.prompts[index])
            assert torch.equal(batch.objects[row], pool.objects[index] | twins.objects[index])
        else:
            assert torch.equal(batch.target_x0[row], batch.x0[row])
            assert batch.cond_types[row] != "t2v" or index is None or index >= 3
    images = stage.pool.sample_images(16, generator, swap_share=1.0)
    assert images.swapped.any() and images.target_x0.shape == images.x0.shape
    assert stage.pool.sample(8, False, generator).swapped is None  # no share, no swap, no extra draws

    spy = _InputSpy()
    assert torch.isfinite(stage.loss(spy, 8, torch.Generator().manual_seed(1), step=1))
    assert (spy.seen["timesteps"] >= stage.cfg.shape_swap_min_t).any()


class _InputSpy(torch.nn.Module):
    """Stands in for the MMDiT: keeps the inputs of its last call and predicts zeros."""

    def __init__(self):
        super().__init__()
        self.anchor, self.seen = torch.nn.Parameter(torch.zeros(())), {}

    def forward(self, **inputs):
        self.seen = inputs
        return torch.zeros_like(inputs["img"]) + 0 * self.anchor


def test_swapped_samples_train_towards_the_twin_at_high_noise(tmp_path, monkeypatch):
    from pipelines.sampling import pack
    from pipelines.training import train
    from pipelines.training.latent_pool import PoolBatch
    from pipelines.training.train import DiTStage

    stage = DiTStage(load_train_config("tiny-dit", [f"outputs={tmp_path}", "data.twin_pool_size=4",
                                                     "shape_swap=0.5", "shape_swap_min_t=0.7", "text_dropout=0"]))
    pool, twins, patch = stage.pool.short, stage.pool.twins, stage.cfg.model["patch_size"]
    swapped = torch.tensor([True, False, True, False])
    batch = PoolBatch(pool.x0[:4], [pool.references(i) for i in range(4)], list(twins.captions[:4]), ["t2v"] * 4,
                      pool.objects[:4] | twins.objects[:4], torch.where(swapped[:, None, None, None, None],
                                                                        twins.x0[:4], pool.x0[:4]), swapped)
    monkeypatch.setattr(stage.pool, "sample", lambda *args, **kwargs: batch)
    spy, targets = _InputSpy(), []
    real_target = train.flow_target
    monkeypatch.setattr(train, "flow_target", lambda *a, **k: targets.append(real_target(*a, **k)) or targets[-1])
    stage.loss(spy, 4, torch.Generator().manual_seed(0), step=1)
    t, x_t, target = spy.seen["timesteps"], spy.seen["img"], targets[0]
    assert (t[swapped] >= 0.7).all()
    # a step along the target from x_t to t = 0 lands on the twin where swapped, on the clip itself elsewhere
    landing = x_t - t[:, None, None] * target
    torch.testing.assert_close(landing[swapped], pack(twins.x0[:4], patch)[swapped], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(landing[~swapped], pack(pool.x0[:4], patch)[~swapped], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="twin_pool_size"):
        load_train_config("tiny-dit", ["shape_swap=0.3"])
    with pytest.raises(ValueError, match="shape_swap_min_t"):
        load_train_config("tiny-dit", ["shape_swap_min_t=1.0"])


def test_encoding_a_pool_reports_its_progress(tiny_vae, monkeypatch, caplog):
    from pipelines.training import latent_pool

    monkeypatch.setattr(latent_pool, "PROGRESS_EVERY_S", 0.0)  # a real pool reports once a minute
    with caplog.at_level(logging.INFO, logger=latent_pool.__name__):
        latent_pool.encode_clip_set(tiny_vae, 4, 9, 32, 0.0, seed=0, encode_batch=2)
    said = [record.getMessage().split(" (")[0] for record in caplog.records]
    assert said == ["latent pool: encoded 2 of 4 clips of 9 frames"]


def test_latent_pool_cache_reuses_encoded_clips_for_the_same_vae_only(tmp_path, tiny_vae, monkeypatch):
    from pipelines.training import latent_pool

    data = load_train_config("tiny-dit").data
    conditions = {"t2v": 1.0, "i2v_loop": 1.0, "v2v_head": 1.0}
    built = latent_pool.build_latent_pool(tiny_vae, data, conditions, 1, tmp_path)
    files = sorted(tmp_path.glob("clips-*.safetensors"))
    assert len(files) == 3 and not list(tmp_path.glob(".*"))  # short, loop and long sets; no temp files left

    def no_encoding(*args, **kwargs):
        raise AssertionError("a cached clip set was encoded again")

    monkeypatch.setattr(latent_pool, "encode_clip_set", no_encoding)
    cached = latent_pool.build_latent_pool(tiny_vae, data, conditions, 1, tmp_path)
    for name in ("short", "loop", "long"):
        a, b = getattr(built, name), getattr(cached, name)
        assert torch.equal(a.x0, b.x0) and torch.equal(a.objects, b.objects)
        assert a.refs.keys() == b.refs.keys() and all(torch.equal(a.refs[k], b.refs[k]) for k in a.refs)
        assert a.captions == b.captions and a.prompts == b.prompts
    tuned = CausalVAE(tiny_vae.config)  # a decoder-only fine-tune keeps the encoding, so the cache stays valid
    tuned.load_state_dict(tiny_vae.state_dict())
    with torch.no_grad():
        next(tuned.decoder.parameters()).add_(1.0)
    latent_pool.build_latent_pool(tuned, data, conditions, 1, tmp_path)
    other = CausalVAE(tiny_vae.config)  # another encoder (fresh weights) must not reuse those latents
    with pytest.raises(AssertionError, match="encoded again"):
        latent_pool.build_latent_pool(other, data, conditions, 1, tmp_path)
    with pytest.raises(AssertionError, match="encoded again"):  # nor another object margin
        latent_pool.build_latent_pool(tiny_vae, data, conditions, 0, tmp_path)


def test_dotted_overrides_edit_nested_config():
    cfg = load_train_config("tiny-dit", ["model.hidden_size=64", "optim.lr=3e-4", "data.pool_size=8"])
    assert cfg.model["hidden_size"] == 64 and cfg.model["depth"] == 1
    assert cfg.optim.lr == 3e-4 and cfg.data.pool_size == 8
    with pytest.raises(ValueError, match="unknown"):
        load_train_config("tiny-dit", ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="timestep_uniform"):
        load_train_config("tiny-dit", ["timestep_uniform=2"])


# ---- train.py -------------------------------------------------------------------------------------------------------

def run_train(args: list[str], launcher: list[str] | None = None, timeout: float = 120) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *(launcher or []), "-m", "pipelines.training.train", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@pytest.mark.parametrize("preset", ["tiny-vae", "tiny-dit"])
def test_train_smoke_runs_three_steps_and_checkpoints(tmp_path, preset):
    log = run_train(["--config", preset, f"outputs={tmp_path}", "steps=3", "threads=1"])
    assert "done: 3 steps" in log
    assert (tmp_path / "checkpoints" / "epoch0-global_step3" / "running_states.json").is_file()


def test_resume_matches_an_uninterrupted_run(tmp_path):
    from pipelines.training.train import main

    common = ["--config", "tiny-dit", "threads=1", "optim.cosine=false", "optim.warmup_steps=2", "ckpt_every=100"]
    whole = main([*common, f"outputs={tmp_path / 'whole'}", "steps=4"])
    main([*common, f"outputs={tmp_path / 'split'}", "steps=2"])
    first = tmp_path / "split" / "checkpoints" / "epoch0-global_step2"
    resumed = main([*common, f"outputs={tmp_path / 'split'}", "steps=4", "--load", str(first)])
    assert resumed.steps == whole.steps == 4
    assert resumed.final_loss == pytest.approx(whole.final_loss, rel=1e-6)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    for a, b in zip(whole.ema.state_dict().values(), resumed.ema.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    saved = safetensors.torch.load_file(resumed.checkpoint / "ema.safetensors")
    assert set(saved) == set(whole.ema.state_dict())
    sampler = json.loads((resumed.checkpoint / "sampler.json").read_text())["sampler"]
    assert sampler["budget_spent_s"] > 0  # a resumed time budget goes on from here


def test_checkpoints_can_be_written_in_the_background(tmp_path):
    from pipelines.training.checkpoint_io import is_complete_checkpoint
    from pipelines.training.train import main

    result = main(["--config", "tiny-vae", f"outputs={tmp_path}", "threads=1", "steps=2", "ckpt_every=1",
                   "ckpt_background=true"])
    assert is_complete_checkpoint(result.checkpoint) and result.checkpoint.name.endswith("global_step2")


def test_tensorboard_events_hold_each_logged_loss_lr_and_pace(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipelines.training.train import main

    result = main(["--config", "tiny-vae", f"outputs={tmp_path}", "threads=1", "steps=3", "tensorboard=true",
                   "optim.warmup_steps=2", "optim.cosine=false"])
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "train/seconds_per_step"}
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3]  # tiny-vae logs every step
    assert losses[-1].value == pytest.approx(result.final_loss, rel=1e-6)
    lr = load_train_config("tiny-vae").optim.lr
    rates = [e.value for e in events.Scalars("train/lr")]
    assert 0 < rates[0] < rates[1] == pytest.approx(lr, rel=1e-6) == rates[2]  # warmed up over 2 steps, then flat
    assert all(e.value > 0 for e in events.Scalars("train/seconds_per_step"))


def test_tensorboard_without_the_package_fails_before_training_with_the_fix(tmp_path, monkeypatch):
    import builtins

    from pipelines.training.reporting import ScalarLog

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(RuntimeError, match="pip install tensorboard"):
        ScalarLog(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
    ScalarLog(None).write(1, loss=1.0)  # off: nothing to write, nothing needed


def test_an_engine_that_saves_its_own_state_writes_it_into_the_checkpoint(tmp_path):
    """ColossalAI's booster writes its sharded model and optimizer itself (`write_extra` / `read_extra`)."""
    from types import SimpleNamespace

    from pipelines.training.checkpoint_io import CheckpointIO
    from pipelines.training.train import StepBudget, _save

    calls = []

    def save_model_and_optimizer(folder):
        (folder / "model").mkdir()
        (folder / "model" / "booster.bin").write_bytes(b"shard")
        calls.append("save")

    engine = SimpleNamespace(unwrapped_model=torch.nn.Linear(2, 2), torch_optimizer=None,
                             save_model_and_optimizer=save_model_and_optimizer,
                             load_model_and_optimizer=lambda folder: calls.append(("load", folder.name)))
    cfg = load_train_config("tiny-vae", [f"outputs={tmp_path}", "ckpt_background=true"])
    saved = _save(cfg, engine, None, None, CheckpointIO(), tmp_path, 3, StepBudget(cfg, 0))
    assert (saved / "model" / "booster.bin").read_bytes() == b"shard" and not (saved / "optimizer.pt").exists()
    CheckpointIO().load(saved, model=None, read_extra=engine.load_model_and_optimizer)
    assert calls == ["save", ("load", saved.name)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_process_gloo_smoke(tmp_path):
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]
    # A time budget: each rank times its own steps, and both must stop at the same one (else a collective hangs).
    log = run_train(["--config", "tiny-dit", f"outputs={tmp_path}", "steps=100000", "time_budget_min=0.15",
                     "threads=1", "log_every=5"], launcher, timeout=240)
    steps = int(re.search(r"done: (\d+) steps", log).group(1))
    assert 10 < steps < 100000  # past StepBudget's first 10 steps: the budget, agreed by both ranks, ended it
    assert (tmp_path / "checkpoints" / f"epoch0-global_step{steps}" / "running_states.json").is_file()


def test_decoder_finetune_leaves_the_encoder_untouched(tmp_path):
    from pipelines.training.train import main

    torch.manual_seed(3)
    start = CausalVAE(CausalVAEConfig.from_dict(TINY_VAE))
    safetensors.torch.save_file(start.state_dict(), tmp_path / "vae.safetensors")
    result = main(["--config", "tiny-vae", f"outputs={tmp_path / 'run'}", "threads=1", "steps=2",
                   "freeze_encoder=true", f"vae_weights={tmp_path / 'vae.safetensors'}"])
    assert_only_the_decoder_moved(start, result.model)


def assert_only_the_decoder_moved(before: CausalVAE, after: CausalVAE) -> None:
    after_state = after.state_dict()
    for name, tensor in before.state_dict().items():
        assert torch.equal(tensor, after_state[name]) == name.startswith(("encoder.", "quant_conv.")), name


def _write_tiny_preset(folder: Path, zero_output: bool) -> Path:
    """A tiny preset folder; with `zero_output` its MMDiT predicts velocity 0 (the training init)."""
    from pipelines.models.mmdit import MMDiT, MMDiTConfig
    from pipelines.training.train_config import TINY_MMDIT
    from pipelines.training.train_default import write_preset

    torch.manual_seed(5)
    mmdit = MMDiT(MMDiTConfig.from_dict(TINY_MMDIT))
    if zero_output:
        mmdit.initialize_weights()
    write_preset(folder, mmdit, CausalVAE(CausalVAEConfig.from_dict(TINY_VAE)), trained=True, notes="", training={})
    return folder


def test_sampled_latents_start_from_the_clip_noised_to_t0(tmp_path):
    from pipelines.training.denoised_latents import SampledLatents, load_preset_mmdit

    z = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    # A model that predicts velocity 0 leaves the noised start as it is: (1 - t0) z + t0 noise.
    still = SampledLatents(load_preset_mmdit(_write_tiny_preset(tmp_path / "zero", True)), _HashTextEncoder(),
                           (0.3, 0.3), num_steps=30, guidance=4.0)
    out = still(z, ["a red circle", "a blue square"], torch.Generator().manual_seed(1))
    noise = (out - 0.7 * z) / 0.3
    assert out.shape == z.shape
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1
    assert not torch.allclose(noise[0], noise[1])  # each clip its own noise
    # A model that predicts something moves the latents along the schedule's steps below t0, reproducibly.
    moving = SampledLatents(load_preset_mmdit(_write_tiny_preset(tmp_path / "rand", False)), _HashTextEncoder(),
                            (0.3, 0.3), num_steps=30, guidance=4.0)
    first = moving(z, ["a red circle", "a blue square"], torch.Generator().manual_seed(1))
    again = moving(z, ["a red circle", "a blue square"], torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.allclose(first, out, atol=1e-3)
    with pytest.raises(ValueError, match="denoise_t"):
        SampledLatents(moving.model, _HashTextEncoder(), (0.5, 1.0), num_steps=30, guidance=4.0)


def test_decoder_learns_from_resampled_latents_with_denoise_with(tmp_path, monkeypatch):
    """The second term is the same reconstruction loss on decode(re-sampled latents): from a velocity-0 model at
    t0 ~ 0 those are the clip's own latents, so the loss doubles; training moves the decoder only."""
    from pipelines.training import train

    monkeypatch.setattr(train, "load_text_encoder", lambda max_length: _HashTextEncoder())
    torch.manual_seed(3)
    start = CausalVAE(CausalVAEConfig.from_dict(TINY_VAE))
    safetensors.torch.save_file(start.state_dict(), tmp_path / "vae.safetensors")
    preset = _write_tiny_preset(tmp_path / "preset", zero_output=True)
    base = ["freeze_encoder=true", f"vae_weights={tmp_path / 'vae.safetensors'}", "threads=1"]
    with pytest.raises(ValueError, match="freeze_encoder"):
        load_train_config("tiny-vae", [f"denoise_with={preset}"])
    plain = train.VAEStage(load_train_config("tiny-vae", base))
    both = train.VAEStage(load_train_config("tiny-vae", [*base, f"denoise_with={preset}", "denoise_t=[1e-4,1e-4]"]))
    model = plain.build_model()
    with torch.no_grad():
        once = plain.loss(model, 2, torch.Generator().manual_seed(7), 0)
        twice = both.loss(model, 2, torch.Generator().manual_seed(7), 0)
    assert float(twice) == pytest.approx(2 * float(once), rel=1e-2)
    result = train.main(["--config", "tiny-vae", f"outputs={tmp_path / 'run'}", "steps=2", *base,
                         f"denoise_with={preset}"])
    assert_only_the_decoder_moved(start, result.model)


def test_dit_stage_warm_starts_from_mmdit_weights(tmp_path):
    from pipelines.models.mmdit import MMDiT, MMDiTConfig
    from pipelines.training.train import DiTStage

    cfg = load_train_config("tiny-dit", [f"outputs={tmp_path}"])
    torch.manual_seed(5)
    start = MMDiT(MMDiTConfig.from_dict(cfg.model))
    safetensors.torch.save_file(start.state_dict(), tmp_path / "mmdit.safetensors")
    stage = DiTStage(load_train_config("tiny-dit", [f"outputs={tmp_path}",
                                                    f"mmdit_weights={tmp_path / 'mmdit.safetensors'}"]))
    warm, fresh = stage.build_model().state_dict(), DiTStage(cfg).build_model().state_dict()
    assert all(torch.equal(warm[k], v) for k, v in start.state_dict().items())
    assert not all(torch.equal(fresh[k], v) for k, v in start.state_dict().items())


def test_time_budget_stops_a_run_that_would_overrun(tmp_path):
    from pipelines.training.train import main

    result = main(["--config", "tiny-vae", f"outputs={tmp_path}", "threads=1", "steps=100000",
                   "time_budget_min=0.005", "log_every=1000"])
    assert 10 <= result.steps < 100000
    assert result.wall_time_s < 30


def test_time_budget_pace_is_not_thrown_by_a_brief_stall(monkeypatch):
    from pipelines.training import train as train_module
    from pipelines.training.lr_schedulers import CosineAnnealingWarmupLR

    clock = [1000.0]
    monkeypatch.setattr(train_module.time, "time", lambda: clock[0])
    cfg = load_train_config("tiny-vae", ["steps=100000", "time_budget_min=1"])
    budget = train_module.StepBudget(cfg, start_step=0)
    scheduler = CosineAnnealingWarmupLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                        total_steps=100000, warmup_steps=5)
    targets = []
    for step in range(1, 201):
        clock[0] += 5.0 if step == 100 else 0.1  # one 5-second stall, as when another process runs briefly
        targets.append(budget.update(step, scheduler))
    assert 550 <= targets[98] <= 620  # 60 s at 0.1 s a step
    # the stall costs its own 5 s (50 steps) once; the schedule is not re-fitted to its pace for a while
    assert min(targets[99:]) >= targets[98] - 60
    assert scheduler.total_steps == targets[-1]


def test_time_budget_counts_the_time_spent_before_a_resume(monkeypatch):
    from pipelines.training import train as train_module
    from pipelines.training.lr_schedulers import CosineAnnealingWarmupLR

    clock = [1000.0]
    monkeypatch.setattr(train_module.time, "time", lambda: clock[0])
    cfg = load_train_config("tiny-vae", ["steps=100000", "time_budget_min=1"])
    fresh = train_module.StepBudget(cfg, start_step=0)
    resumed = train_module.StepBudget(cfg, start_step=300, spent_s=30.0)  # half the minute was used before
    scheduler = CosineAnnealingWarmupLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                        total_steps=100000, warmup_steps=5)
    for step in range(1, 51):
        clock[0] += 0.1
        end_fresh = fresh.update(step, scheduler)
        end_resumed = resumed.update(300 + step, scheduler)
    assert 550 <= end_fresh <= 620  # 60 s at 0.1 s a step
    assert abs(end_resumed - end_fresh) <= 5  # the same end: the schedule does not stretch over a new minute
    assert resumed.elapsed_s() == pytest.approx(35.0)


def test_vae_object_weight_marks_exactly_the_object_pixels():
    from pipelines.training.shapes import BACKGROUNDS, render_clip, sample_spec
    from pipelines.training.train import VAEStage
    import random

    spec = sample_spec(random.Random(4), size=32, num_frames=5, background="gray", color="black", shape="square")
    clip = torch.from_numpy(render_clip(spec, 5, 32)).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, T, H, W)
    plain = VAEStage(load_train_config("tiny-vae"))
    weighted = VAEStage(load_train_config("tiny-vae", ["object_weight=4"]))
    assert torch.equal(plain.pixel_weights(clip[None], ["gray"]), torch.ones(1, 1, 5, 32, 32))
    weights = weighted.pixel_weights(clip[None], ["gray"])[0, 0]  # (T, H, W)
    gray = torch.tensor(BACKGROUNDS["gray"]).float() / 127.5 - 1
    on_object = (clip - gray[:, None, None, None]).abs().amax(0) > 0.05
    assert on_object.any() and (~on_object).any()
    assert torch.equal(weights, torch.where(on_object, 5.0, 1.0))


def test_vae_object_margin_weights_the_background_ring_around_the_object():
    from pipelines.training.train import VAEStage

    x = torch.full((1, 3, 2, 16, 16), 10 / 127.5 - 1.0)  # the black background
    x[:, 0, :, 6:9, 6:9] = 1.0  # a 3x3 red patch
    stage = VAEStage(load_train_config("tiny-vae", ["object_weight=4", "object_margin=2"]))
    weights = stage.pixel_weights(x, ["black"])[0, 0]
    expected = torch.ones(2, 16, 16)
    expected[:, 4:11, 4:11] = 5.0  # the patch grown by 2 px on every side, in every frame
    assert torch.equal(weights, expected)
    with pytest.raises(ValueError, match="object_margin"):
        load_train_config("tiny-vae", ["object_margin=-1"])
    with pytest.raises(ValueError, match="set object_weight"):
        load_train_config("tiny-vae", ["object_margin=2"])


class _FakeVAE:
    """Encode is the identity; decode returns the frames, or one flat brown when `brown`."""

    def __init__(self, brown: bool):
        self.brown = brown

    def encode(self, x):
        return x

    def decode(self, z):
        return torch.full_like(z, 0.2) if self.brown else z

    def parameters(self):
        yield torch.zeros(1)  # (clips go to the VAE's device and dtype)


def test_colour_fidelity_tells_a_faithful_vae_from_one_that_loses_colour():
    from pipelines.training.train_default import colour_fidelity

    faithful, brown = colour_fidelity(_FakeVAE(False)), colour_fidelity(_FakeVAE(True))
    assert faithful == {"object_colour_right": 1.0, "object_colour_error": 0.0}
    assert brown["object_colour_right"] < 0.2 and brown["object_colour_error"] > 50


@pytest.mark.parametrize("flags", [["--minutes-dit", "0"], ["--minutes-vae", "0"]])
def test_train_default_refuses_a_zero_budget_instead_of_training_without_limit(tmp_path, flags, capsys):
    from pipelines.training.train_default import main

    with pytest.raises(SystemExit):
        main([*flags, "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert "must be positive" in capsys.readouterr().err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_train_default_runs_every_stage_and_writes_a_preset_the_engine_generates_with(tmp_path):
    """The one-command recipe end to end at toy size: VAE -> MMDiT -> decoder fine-tune -> preset -> a clip."""
    import json

    from pipelines.engine import Engine
    from pipelines.options import GenerationOptions
    from pipelines.presets import load_embedded_preset
    from pipelines.training.train_config import TINY_MMDIT, TINY_VAE
    from pipelines.training.train_default import main

    small = ["data.size=32", "batch_size=2", "steps=2", "log_every=1", "ckpt_every=100"]
    vae = ["data.num_frames=5", *small]
    dit = [f"model={json.dumps(TINY_MMDIT)}", "data.num_frames=9", "data.long_frames=37", "data.pool_size=4",
           "data.loop_pool_size=2", "data.long_pool_size=2", "data.encode_batch=4", "long_batch_size=2",
           "long_every=2", *small]
    out = tmp_path / "preset"
    main(["--work", str(tmp_path / "work"), "--out", str(out), "--minutes-vae", "5", "--minutes-dit", "5",
          "--minutes-decoder", "5", "--vae-set", f"vae={json.dumps(TINY_VAE)}", *vae, "--dit-set", *dit,
          "--decoder-set", *vae])
    config = json.loads((out / "config.json").read_text())
    assert config["trained"] and config["training"]["steps"] == {"vae": 2, "dit": 2, "decoder": 2}
    assert config["vae"]["latent_channels"] == TINY_VAE["latent_channels"]
    assert config["vae"]["scale_factor"] != 1.0  # latents rescaled to unit variance from the measured std
    engine = Engine(load_embedded_preset(out), output_dir=tmp_path / "outputs", preview_every=0).load()
    made = engine.generate_frames(GenerationOptions(prompt="a red circle moving right", num_frames=9, num_steps=2,
                                                    seed=1))
    assert tuple(made.video.shape) == (3, 9, 64, 64)


def test_preset_with_a_float16_mmdit_file_loads_as_float32_weights(tmp_path):
    from pipelines.components import load_components
    from pipelines.models.mmdit import MMDiT, MMDiTConfig
    from pipelines.presets import load_embedded_preset
    from pipelines.training.train_config import TINY_MMDIT
    from pipelines.training.train_default import write_preset

    torch.manual_seed(0)
    mmdit, vae = MMDiT(MMDiTConfig.from_dict(TINY_MMDIT)), CausalVAE(CausalVAEConfig.from_dict(TINY_VAE))
    write_preset(tmp_path / "p", mmdit, vae, trained=True, notes="", training={}, mmdit_dtype=torch.float16)
    stored = safetensors.torch.load_file(tmp_path / "p" / "mmdit.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    vae_file = safetensors.torch.load_file(tmp_path / "p" / "vae.safetensors")
    assert {t.dtype for t in vae_file.values()} == {torch.float32}
    loaded = load_components(load_embedded_preset(tmp_path / "p"), torch.device("cpu")).mmdit
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, mmdit.state_dict()[key].half().float(), rtol=0, atol=0)


def test_edge_loss_tells_a_blurred_outline_from_a_sharp_one():
    from pipelines.training.losses import edge_loss

    x = torch.full((1, 3, 1, 8, 8), -1.0)
    x[..., 2:6, 2:6] = 1.0  # a sharp square
    assert edge_loss(x, x) == 0
    assert edge_loss(x + 0.25, x) < 1e-6  # a uniform offset has no gradient error (the per-pixel loss sees it)
    blurred = torch.nn.functional.avg_pool3d(x, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    assert edge_loss(blurred, x) > 0.1
    # Weighting: an error only where the weight is 1 counts less than the same error where it is 11.
    noise = torch.zeros_like(x)
    noise[..., 0, 0] = 1.0  # one bad corner pixel
    light, heavy = torch.ones(1, 1, 1, 8, 8), torch.ones(1, 1, 1, 8, 8)
    heavy[..., :2, :2] = 11.0
    assert edge_loss(x + noise, x, heavy) > edge_loss(x + noise, x, light) > 0
    with pytest.raises(ValueError, match="edge_weight"):
        load_train_config("tiny-vae", ["edge_weight=-1"])


def test_vae_stage_adds_the_edge_loss_when_asked(monkeypatch):
    from pipelines.training import train
    from pipelines.training.train import VAEStage

    monkeypatch.setattr(train, "edge_loss", lambda recon, x, weight: torch.tensor(0.25))
    torch.manual_seed(0)
    plain, edged = (VAEStage(load_train_config("tiny-vae", extra)) for extra in ([], ["edge_weight=2"]))
    model = plain.build_model()
    losses = [stage.loss(model, 2, torch.Generator().manual_seed(3), 0) for stage in (plain, edged)]
    # same clips and model: only edge_weight * edge
    assert float((losses[1] - losses[0]).detach()) == pytest.approx(2 * 0.25)


def test_color_loss_sees_a_colour_shift_of_the_object_alone():
    from pipelines.training.losses import color_loss

    x = torch.full((1, 3, 2, 8, 8), -0.06)  # gray
    x[:, :, 0, 2:6, 2:6] = torch.tensor([0.73, -0.69, -0.69])[:, None, None]  # a red square on frame 0 only
    on_object = (x - x[..., :1, :1]).abs().amax(dim=1, keepdim=True).gt(0.05).float()
    assert color_loss(x, x, on_object) == 0
    orange = x.clone()
    orange[:, 1, 0, 2:6, 2:6] += 0.6  # green up on the object: red turns orange
    # the mean over the object's frame and channels (frame 1 has no object and counts nothing)
    assert float(color_loss(orange, x, on_object)) == pytest.approx(0.6 / 3)
    background_only = x.clone()
    background_only[..., :, :2] += 0.5  # a change away from the object is the per-pixel loss's business
    assert float(color_loss(background_only, x, on_object)) == pytest.approx(0.0)
    assert float(color_loss(x, x, torch.zeros_like(on_object))) == 0  # no object anywhere: nothing to compare
    with pytest.raises(ValueError, match="color_weight"):
        load_train_config("tiny-vae", ["color_weight=-1"])


def test_vae_stage_adds_the_color_loss_on_the_object_when_asked(monkeypatch):
    from pipelines.training import train
    from pipelines.training.train import VAEStage

    seen = []

    def fake_color_loss(recon, x, on_object):
        seen.append(on_object)
        return torch.tensor(0.125)

    monkeypatch.setattr(train, "color_loss", fake_color_loss)
    torch.manual_seed(0)
    plain, colored = (VAEStage(load_train_config("tiny-vae", extra)) for extra in ([], ["color_weight=4"]))
    model = plain.build_model()
    losses = [stage.loss(model, 2, torch.Generator().manual_seed(3), 0) for stage in (plain, colored)]
    assert float((losses[1] - losses[0]).detach()) == pytest.approx(4 * 0.125)
    assert len(seen) == 1 and 0 < float(seen[0].mean()) < 0.5  # the object's pixels: some, not most


def test_dit_stage_adds_an_edge_loss_on_the_unpacked_velocity(tmp_path, monkeypatch):
    from pipelines.sampling import pack, unpack
    from pipelines.training import train
    from pipelines.training.train import DiTStage

    stage = DiTStage(load_train_config("tiny-dit", [f"outputs={tmp_path}", "object_weight=3", "edge_weight=2"]))
    model, patch = stage.build_model(), stage.cfg.model["patch_size"]
    x0 = stage.pool.short.x0[:2]  # (B, C, T, h, w)
    objects = stage.pool.short.objects[:2]  # (B, T, h, w)
    pred, target = pack(torch.randn_like(x0), patch), pack(x0, patch)
    frame_mask = torch.zeros(2, x0.shape[2], dtype=torch.bool)
    frame_mask[0, 0] = True  # sample 0's first frame is given
    seen = []

    def spy(recon, x, weight):
        seen.append((recon, x, weight))
        return torch.tensor(0.25)

    monkeypatch.setattr(train, "edge_loss", spy)
    assert float(stage.edge_term(pred, target, objects, frame_mask, x0.shape)) == 0.25
    recon, x, weight = seen[-1]
    torch.testing.assert_close(recon, unpack(pred, *x0.shape[2:], patch))
    torch.testing.assert_close(x, x0)
    assert weight.shape == (2, 1, *x0.shape[2:])
    assert (weight[0, :, 0] == 0).all() and set(weight[1, :, 0].unique().tolist()) == {1.0, 4.0}
    torch.testing.assert_close(weight[:, 0, 1:], 1 + 3 * objects[:, 1:].float())
    stage.cfg.exclude_conditioned_loss = False
    stage.edge_term(pred, target, objects, frame_mask, x0.shape)
    assert (seen[-1][2][0, :, 0] > 0).all()  # conditioned frames count when the loss keeps them
    stage.cfg.exclude_conditioned_loss = True
    edged = stage.loss(model, 2, torch.Generator().manual_seed(5), step=0)
    stage.cfg.edge_weight = 0.0
    plain = stage.loss(model, 2, torch.Generator().manual_seed(5), step=0)  # the same batch, noise and t
    assert float((edged - plain).detach()) == pytest.approx(2 * 0.25)
    monkeypatch.undo()
    assert float(stage.edge_term(target, target, objects, frame_mask, x0.shape)) == 0.0
    assert float(stage.edge_term(pred, target, objects, frame_mask, x0.shape)) > 0.0


def _mmdit(patch: int, seed: int):
    from pipelines.models.mmdit import MMDiT, MMDiTConfig

    torch.manual_seed(seed)
    cfg = dict(load_train_config("tiny-dit").model, patch_size=patch, in_channels=4 * patch * patch)
    return MMDiT(MMDiTConfig.from_dict(cfg))


def test_folded_embedders_read_patch_constant_latents_like_the_coarse_patch():
    from pipelines.sampling import pack
    from pipelines.training.warm_start import repatch_mmdit_state

    coarse = _mmdit(4, 0)
    fine_state = repatch_mmdit_state(coarse.state_dict(), 4, 2)
    # A latent constant over every 4x4 patch: each 2x2 token must embed like the 4x4 patch it lies in.
    z = torch.randn(1, 5, 2, 2, 2).repeat_interleave(4, dim=3).repeat_interleave(4, dim=4)  # (B, 1 + C, T, 8, 8)
    for key, x in (("img_in", z[:, 1:]), ("cond_in", z)):
        w4, b = coarse.state_dict()[f"{key}.weight"], coarse.state_dict()[f"{key}.bias"]
        h4 = pack(x, 4) @ w4.T + b  # (1, T * 2 * 2, D)
        h2 = (pack(x, 2) @ fine_state[f"{key}.weight"].T + b).reshape(1, 2, 4, 4, -1)  # (1, T, h, w, D)
        expected = h4.reshape(1, 2, 2, 2, -1).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        torch.testing.assert_close(h2, expected, rtol=1e-5, atol=1e-5)


def test_folded_output_layer_predicts_the_mean_of_the_positions_it_folds():
    from pipelines.sampling import unpack
    from pipelines.training.warm_start import repatch_mmdit_state

    coarse = _mmdit(4, 1)
    fine = repatch_mmdit_state(coarse.state_dict(), 4, 2)
    h = torch.randn(1, 1, 32)
    weights = coarse.state_dict()
    out4 = unpack(h @ weights["final_layer.linear.weight"].T + weights["final_layer.linear.bias"],
                  1, 4, 4, 4)  # one 4x4 patch -> (1, C, 1, 4, 4)
    out2 = h @ fine["final_layer.linear.weight"].T + fine["final_layer.linear.bias"]  # (1, 1, C * 4)
    expected = out4.reshape(1, 4, 1, 2, 2, 2, 2).mean(dim=(3, 5))  # average the 2x2 sub-patches' same offsets
    torch.testing.assert_close(out2.reshape(1, 4, 1, 2, 2), expected, rtol=1e-5, atol=1e-5)
    untouched = [k for k in fine if "img_in" not in k and "cond_in" not in k and "final_layer.linear" not in k]
    assert untouched and all(torch.equal(fine[k], coarse.state_dict()[k]) for k in untouched)


def test_dit_stage_warm_starts_across_patch_sizes_and_refuses_finer_to_coarser(tmp_path):
    from pipelines.training.train import DiTStage
    from pipelines.training.warm_start import repatch_mmdit_state

    safetensors.torch.save_file(_mmdit(4, 2).state_dict(), tmp_path / "p4.safetensors")
    cfg = load_train_config("tiny-dit", [f"outputs={tmp_path}", "model.patch_size=2", "model.in_channels=16",
                                         f"mmdit_weights={tmp_path / 'p4.safetensors'}"])
    model = DiTStage(cfg).build_model()
    expected = repatch_mmdit_state(safetensors.torch.load_file(tmp_path / "p4.safetensors"), 4, 2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(ValueError, match="divides"):
        repatch_mmdit_state(_mmdit(2, 3).state_dict(), 2, 4)


def _mmdit_inputs(model, seed: int = 0):
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    L, T = 8, 5
    return dict(img=torch.randn(2, L, cfg.in_channels, generator=g),
                img_ids=torch.randint(0, 4, (2, L, 3), generator=g).float(),
                txt=torch.randn(2, T, cfg.context_in_dim, generator=g), txt_ids=torch.zeros(2, T, 3),
                timesteps=torch.rand(2, generator=g), y_vec=torch.randn(2, cfg.vec_in_dim, generator=g),
                cond=torch.randn(2, L, cfg.in_channels + cfg.patch_size ** 2, generator=g))


@pytest.mark.parametrize("fused,depth", [(False, 1), (True, 1), (False, 0)])  # depth 0: single blocks only
def test_widened_mmdit_computes_the_same_function_with_copies_free_to_diverge(fused, depth):
    from pipelines.models.mmdit import MMDiT, MMDiTConfig
    from pipelines.training.warm_start import widen_mmdit_state

    torch.manual_seed(0)
    base = dict(load_train_config("tiny-dit").model, fused_qkv=fused, depth=depth)
    narrow = MMDiT(MMDiTConfig.from_dict(base)).eval()  # default (non-zero) init: every gate and shift matters
    wide = MMDiT(MMDiTConfig.from_dict(dict(base, hidden_size=64, num_heads=4))).eval()
    state = widen_mmdit_state(narrow.state_dict(), 2)
    wide.load_state_dict(state, strict=True)
    with torch.no_grad():
        expected, got = narrow(**_mmdit_inputs(narrow)), wide(**_mmdit_inputs(wide))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # The reading halves of a layer differ (zero-sum noise), so training can pull the copies apart.
    w = state["single_blocks.0.linear2.weight"]  # reads [attention, attention copy, MLP, MLP copy]
    assert not torch.equal(w[:, :32], w[:, 32:64])
    torch.testing.assert_close(w[:, :32] + w[:, 32:64], narrow.state_dict()["single_blocks.0.linear2.weight"][:, :32]
                               .repeat(2, 1), rtol=1e-5, atol=1e-6)


def test_dit_stage_warm_starts_a_wider_model_and_refuses_a_partial_factor(tmp_path):
    from pipelines.training.train import DiTStage

    safetensors.torch.save_file(_mmdit(2, 4).state_dict(), tmp_path / "narrow.safetensors")
    weights = f"mmdit_weights={tmp_path / 'narrow.safetensors'}"
    wide = DiTStage(load_train_config("tiny-dit", [f"outputs={tmp_path}", "model.hidden_size=96", "model.num_heads=6",
                                                   weights])).build_model()
    assert wide.state_dict()["img_in.weight"].shape[0] == 96
    torch.testing.assert_close(wide.state_dict()["img_in.weight"][64:], _mmdit(2, 4).state_dict()["img_in.weight"])
    with pytest.raises(ValueError, match="whole factor"):
        DiTStage(load_train_config("tiny-dit", [f"outputs={tmp_path}", "model.hidden_size=48", "model.num_heads=3",
                                                weights])).build_model()


def test_dit_stage_keeps_only_the_blocks_for_a_new_latent_space(tmp_path):
    """`mmdit_fresh_io`: weights from another VAE's latent space (here patch 2 -> patch 4, which folding refuses)
    keep every block and embedder of text, time and vector; the three latent-facing layers start as a fresh model
    starts them (the output projection at zero, so the first prediction is zero velocity)."""
    from pipelines.models.mmdit import MMDiT, MMDiTConfig
    from pipelines.training.train import DiTStage
    from pipelines.training.warm_start import widen_mmdit_state

    torch.manual_seed(4)
    base = dict(load_train_config("tiny-dit").model, hidden_size=64, num_heads=4)
    source = MMDiT(MMDiTConfig.from_dict(dict(base, patch_size=2, in_channels=16))).state_dict()
    safetensors.torch.save_file(source, tmp_path / "p2.safetensors")
    args = [f"outputs={tmp_path}", "model.patch_size=4", "model.in_channels=64", "model.hidden_size=64",
            "model.num_heads=4", f"mmdit_weights={tmp_path / 'p2.safetensors'}"]
    with pytest.raises(ValueError, match="divides"):
        DiTStage(load_train_config("tiny-dit", args)).build_model()
    got = DiTStage(load_train_config("tiny-dit", [*args, "mmdit_fresh_io=true"])).build_model().state_dict()
    is_io = lambda key: key.startswith(("img_in.", "cond_in.", "final_layer.linear."))  # noqa: E731
    assert sum(map(is_io, got)) == 6 and got["img_in.weight"].shape == (64, 64)
    assert got["final_layer.linear.weight"].shape == (64, 64)
    assert not got["final_layer.linear.weight"].any() and not got["cond_in.weight"].any()
    assert all(torch.equal(got[k], source[k]) for k in got if not is_io(k))
    assert torch.equal(got["final_layer.adaLN_modulation.1.weight"], source["final_layer.adaLN_modulation.1.weight"])
    # widening still applies to the kept layers
    wide = DiTStage(load_train_config("tiny-dit", [*args, "mmdit_fresh_io=true", "model.hidden_size=128",
                                                   "model.num_heads=8"])).build_model().state_dict()
    saved = safetensors.torch.load_file(tmp_path / "p2.safetensors")  # (the widening's noise follows key order)
    expected = widen_mmdit_state({k: v for k, v in saved.items() if not is_io(k)}, 2)
    assert wide["img_in.weight"].shape == (128, 64)
    assert all(torch.equal(wide[k], v) for k, v in expected.items())


def test_dit_config_refuses_tokens_wider_than_the_model():
    """A token of C·p² features embedded into fewer dimensions cannot carry its noise through the blocks: the part
    of the velocity that is that noise is lost (a patch-8 MMDiT on 8-channel latents, 512 features into 192,
    stalled at a flow loss of ~0.85 where patch 4 reaches ~0.15) — unless the model predicts data."""
    with pytest.raises(ValueError, match="exceeds model.hidden_size"):
        load_train_config("tiny-dit", ["model.patch_size=4", "model.in_channels=64"])
    assert load_train_config("tiny-dit", ["model.patch_size=4", "model.in_channels=64", "model.hidden_size=64",
                                          "model.num_heads=4"]).model["in_channels"] == 64
    # predicting data, the noise reaches the velocity through x_t itself
    assert load_train_config("tiny-dit", ["model.patch_size=4", "model.in_channels=64",
                                          "model.prediction=data"]).model["prediction"] == "data"


def test_a_vae_narrowed_to_fewer_latent_channels_encodes_those_channels(tmp_path):
    """`vae_latent_keep`: with quant_conv and post_quant_conv at identity the narrowed VAE's posterior mean is the
    kept channels of the wide one's, and its decoder reads them with the wide decoder's weights for them."""
    from pipelines.models.vae import CausalVAE, CausalVAEConfig
    from pipelines.training.train import VAEStage
    from pipelines.training.warm_start import narrow_vae_state

    torch.manual_seed(0)
    tiny = load_train_config("tiny-vae").vae
    wide = CausalVAE(CausalVAEConfig.from_dict(tiny)).eval()
    with torch.no_grad():
        for conv in (wide.quant_conv, wide.post_quant_conv):
            conv.weight.copy_(torch.eye(conv.weight.shape[0]).reshape(conv.weight.shape))
            conv.bias.zero_()
    safetensors.torch.save_file(wide.state_dict(), tmp_path / "wide.safetensors")
    cfg = load_train_config("tiny-vae", [f"outputs={tmp_path}", "vae.latent_channels=2", "vae_latent_keep=[3,1]",
                                         f"vae_weights={tmp_path / 'wide.safetensors'}"])
    narrow = VAEStage(cfg).build_model().eval()
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(narrow.encode(x), wide.encode(x)[:, [3, 1]])
    conv_in = wide.state_dict()["decoder.conv_in.conv.weight"]
    assert torch.equal(narrow.state_dict()["decoder.conv_in.conv.weight"], conv_in[:, [3, 1]])
    with pytest.raises(ValueError, match="distinct indices"):
        narrow_vae_state(wide.state_dict(), [1, 1])
    with pytest.raises(ValueError, match="names 1 channels"):
        load_train_config("tiny-vae", ["vae.latent_channels=2", "vae_latent_keep=[0]"])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _HashTextEncoder:
    """A stand-in for MiniLM (the device under test is the GPU, not the text encoder): fixed random features."""

    def __call__(self, captions):
        g = torch.Generator().manual_seed(len(captions))
        return torch.randn(len(captions), 32, 384, generator=g), None, torch.randn(len(captions), 384, generator=g)


@needs_cuda
@pytest.mark.parametrize("stage", ["tiny-vae", "tiny-dit"])
def test_training_stages_run_on_cuda(stage, tmp_path, monkeypatch):
    """CPU-drawn batches (the same data on any device) reach the GPU model: a few steps, finite loss."""
    import math

    from pipelines.training import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(train, "load_text_encoder", lambda max_length: _HashTextEncoder())
    result = train.train(load_train_config(stage, [f"outputs={tmp_path}", "steps=3"]))
    assert next(result.model.parameters()).device.type == "cuda"
    assert result.steps == 3 and math.isfinite(result.final_loss)


def test_vae_round_trip_keeps_the_clip_shape_and_refuses_a_diverged_vae():
    import numpy as np

    from pipelines.training.train_default import round_trip

    torch.manual_seed(0)
    vae = CausalVAE(CausalVAEConfig.from_dict(TINY_VAE)).eval()
    clip = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    out = round_trip(vae, clip)
    assert out.shape == clip.shape and out.dtype == np.uint8
    with torch.no_grad():
        next(vae.decoder.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        round_trip(vae, clip)
