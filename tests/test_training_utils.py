"""EMA, LR schedules, optimizer construction and report formatting for training."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from pipelines.training.ema import create_ema, place_ema, update_ema
from pipelines.training.lr_schedulers import (
    CosineAnnealingWarmupLR,
    LinearWarmupLR,
    create_lr_scheduler,
    create_optimizer,
    set_eps,
    set_lr,
    set_warmup_steps,
)
from pipelines.training.reporting import format_duration, format_numel_str, get_model_numel, to_torch_dtype


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def lrs_over(scheduler, steps: int) -> list[float]:
    """Rate in force before each of `steps` optimizer steps."""
    seen = []
    for _ in range(steps):
        seen.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return seen


# ---- EMA --------------------------------------------------------------------------------------


def test_create_ema_is_a_frozen_fp32_eval_copy():
    model = tiny_model().to(torch.bfloat16)
    ema = create_ema(model)
    assert ema is not model and not ema.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the model itself is untouched
    for (_, e), (_, m) in zip(ema.named_parameters(), model.named_parameters()):
        assert torch.equal(e, m.float())


def test_update_ema_follows_the_decay_formula():
    model = tiny_model()
    ema = create_ema(model)
    before = {n: p.clone() for n, p in ema.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_ema(ema, model, decay=0.9)
    for name, p in model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p
        torch.testing.assert_close(dict(ema.named_parameters())[name], expected, rtol=0, atol=1e-6)


def test_update_ema_prefers_fp32_master_weights_and_skips_frozen_params():
    model = tiny_model()
    ema = create_ema(model)
    model[0].weight.requires_grad_(False)
    masters = {name: torch.full_like(p, 3.0, dtype=torch.float32) for name, p in model.named_parameters()}
    frozen_before = ema[0].weight.clone()
    update_ema(ema, model, decay=0.0, master_params=masters)  # decay 0: the EMA becomes the weights
    assert torch.equal(ema[0].weight, frozen_before)
    assert torch.equal(ema[2].weight, torch.full_like(ema[2].weight, 3.0))


def test_update_ema_decay_one_keeps_the_average_and_rejects_bad_decay():
    model = tiny_model()
    ema = create_ema(model)
    with torch.no_grad():
        model[0].weight.mul_(5)
    update_ema(ema, model, decay=1.0)
    assert not torch.equal(ema[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="decay"):
        update_ema(ema, model, decay=1.5)


def test_update_ema_names_a_mismatched_model():
    ema = create_ema(tiny_model())
    other = nn.Sequential(nn.Linear(4, 8))
    other.add_module("extra", nn.Linear(8, 1))
    with pytest.raises(ValueError, match="extra.weight"):
        update_ema(ema, other)


def test_the_ema_follows_the_model_to_its_device_unless_the_model_is_sharded():
    ema = create_ema(tiny_model())
    moved = place_ema(ema, "meta", sharded=False)  # stands in for the GPU: any device the model trains on
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in moved.parameters())
    kept = place_ema(create_ema(tiny_model()), "meta", sharded=True)
    assert all(p.device.type == "cpu" for p in kept.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_ema_on_the_gpu_updates_in_place_there():
    model = tiny_model().cuda()
    ema = place_ema(create_ema(model), "cuda", sharded=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {name: p.detach().cpu() - 1.0 for name, p in model.named_parameters()}  # what the EMA was
    update_ema(ema, model, decay=0.5)
    for name, p in ema.named_parameters():
        assert p.is_cuda
        torch.testing.assert_close(p.cpu(), before[name] + 0.5)


# ---- LR schedulers ----------------------------------------------------------------------------


def test_linear_warmup_matches_open_sora_formula():
    optimizer = torch.optim.AdamW(tiny_model().parameters(), lr=1e-3)
    scheduler = LinearWarmupLR(optimizer, initial_lr=1e-6, warmup_steps=4)
    seen = lrs_over(scheduler, 7)
    expected = [1e-6 + (k + 1) / 5 * (1e-3 - 1e-6) for k in range(4)] + [1e-3] * 3
    assert seen == pytest.approx(expected, rel=1e-12)


def test_linear_warmup_with_zero_steps_is_constant():
    optimizer = torch.optim.AdamW(tiny_model().parameters(), lr=2e-4)
    assert lrs_over(LinearWarmupLR(optimizer, warmup_steps=0), 3) == [2e-4] * 3


def test_cosine_warms_up_then_anneals_to_eta_min():
    optimizer = torch.optim.AdamW(tiny_model().parameters(), lr=1.0)
    scheduler = CosineAnnealingWarmupLR(optimizer, total_steps=10, warmup_steps=2, eta_min=0.1)
    seen = lrs_over(scheduler, 12)
    assert seen[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert seen[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert seen[10:] == pytest.approx([0.1, 0.1])  # stays at eta_min past total_steps
    assert all(a >= b for a, b in itertools.pairwise(seen[2:]))


def test_refitting_the_cosine_end_never_raises_the_rate():
    optimizer = torch.optim.AdamW(tiny_model().parameters(), lr=1.0)
    scheduler = CosineAnnealingWarmupLR(optimizer, total_steps=1000, warmup_steps=5, eta_min=0.0)
    seen = lrs_over(scheduler, 300)
    now = scheduler.lrs_at(scheduler.last_epoch)[0]
    scheduler.refit(400)  # a slow spell pulls the end in ...
    assert scheduler.lrs_at(scheduler.last_epoch)[0] == pytest.approx(now)  # ... the rate goes on from there
    seen += lrs_over(scheduler, 50)
    scheduler.refit(2000)  # ... then the pace recovers and the end moves out again
    seen += lrs_over(scheduler, 1700)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(seen[5:]))  # never climbs back after the warmup
    assert seen[-1] == pytest.approx(0.0, abs=1e-9) and seen[400] > 0.01  # ends at eta_min, on the new end
    state = scheduler.state_dict()
    twin = CosineAnnealingWarmupLR(torch.optim.AdamW(tiny_model().parameters(), lr=1.0), total_steps=1000,
                                   warmup_steps=5)
    twin.load_state_dict(state)  # the refit survives a checkpoint
    assert twin.anchor == scheduler.anchor and twin.lrs_at(1900) == scheduler.lrs_at(1900)


@pytest.mark.parametrize("make", [
    lambda opt: LinearWarmupLR(opt, initial_lr=1e-6, warmup_steps=5),
    lambda opt: CosineAnnealingWarmupLR(opt, total_steps=20, warmup_steps=3, eta_min=1e-5),
])  # fmt: skip
def test_scheduler_state_dict_round_trip_continues_the_schedule(make):
    first = make(torch.optim.AdamW(tiny_model().parameters(), lr=1e-3))
    lrs_over(first, 4)
    state = first.state_dict()
    second = make(torch.optim.AdamW(tiny_model().parameters(), lr=1e-3))
    second.load_state_dict(state)
    assert lrs_over(second, 6) == lrs_over(first, 6)


def test_create_lr_scheduler_dispatch_like_upstream():
    optimizer = torch.optim.AdamW(tiny_model().parameters(), lr=1e-3)
    assert create_lr_scheduler(optimizer, num_steps_per_epoch=10, epochs=2) is None
    linear = create_lr_scheduler(optimizer, 10, 2, warmup_steps=3)
    assert isinstance(linear, LinearWarmupLR) and linear.initial_lr == 1e-6
    cosine = create_lr_scheduler(optimizer, 10, 2, use_cosine_scheduler=True)
    assert isinstance(cosine, CosineAnnealingWarmupLR) and cosine.total_steps == 20 and cosine.warmup_steps == 0


def test_schedulers_reject_bad_settings():
    optimizer = torch.optim.AdamW(tiny_model().parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="warmup_steps"):
        LinearWarmupLR(optimizer, warmup_steps=-1)
    with pytest.raises(ValueError, match="exceed"):
        CosineAnnealingWarmupLR(optimizer, total_steps=5, warmup_steps=6)


# ---- optimizer and overrides ------------------------------------------------------------------


def test_create_optimizer_is_adamw_over_trainable_params_only():
    model = tiny_model()
    model[1].requires_grad_(False)
    optimizer = create_optimizer(model, lr=5e-5)
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (5e-5, (0.9, 0.999), 1e-15, 0.0)


def test_create_optimizer_refuses_a_fully_frozen_model():
    model = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_optimizer(model, lr=1e-4)


def test_set_lr_eps_and_warmup_apply_to_the_next_step():
    optimizer = create_optimizer(tiny_model(), lr=1e-3)
    scheduler = LinearWarmupLR(optimizer, initial_lr=0.0, warmup_steps=10)
    lrs_over(scheduler, 3)
    set_lr(optimizer, scheduler, 2e-3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4 / 11 * 2e-3)  # still 3 steps into warmup
    set_warmup_steps(scheduler, 0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)
    set_eps(optimizer, 1e-8)
    assert optimizer.param_groups[0]["eps"] == 1e-8
    set_eps(optimizer, None)
    assert optimizer.param_groups[0]["eps"] == 1e-8


# ---- reporting --------------------------------------------------------------------------------


def test_report_formatting():
    assert format_numel_str(11_000_000_000) == "11.00 B"
    assert format_numel_str(1234) == "1.23 K"
    assert format_numel_str(12) == "12"
    assert format_duration(42) == "42.0s"
    assert format_duration(3723) == "1h 02m 03s"
    assert format_duration(90061) == "1d 01h 01m 01s"
    assert to_torch_dtype("bf16") is torch.bfloat16 and to_torch_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        to_torch_dtype("fp8")
    model = tiny_model()
    model[0].requires_grad_(False)
    total, trainable = get_model_numel(model)
    assert (total, trainable) == (40 + 16 + 18, 16 + 18)
