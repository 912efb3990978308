"""Optimizer and learning-rate schedules for training, plus the knobs a resumed run may override.

Step convention (as in torch): `scheduler.last_epoch` counts `scheduler.step()` calls, and the
rate in force for the k-th optimizer step (k = 0, 1, ...) is the one set after k `step()`s.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "CosineAnnealingWarmupLR",
    "LinearWarmupLR",
    "create_lr_scheduler",
    "create_optimizer",
    "set_eps",
    "set_lr",
    "set_warmup_steps",
]


class LinearWarmupLR(LRScheduler):
    """Linear ramp from `initial_lr` toward each group's base lr over `warmup_steps`, then constant.

    During warmup lr = initial_lr + (step+1)/(warmup_steps+1)·(base_lr − initial_lr): the ramp
    never quite reaches base_lr inside the warmup, matching Open-Sora's schedule.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, initial_lr: float = 0.0, warmup_steps: int = 0, last_epoch: int = -1
    ):
        _check_warmup_steps(warmup_steps)
        self.initial_lr = float(initial_lr)
        self.warmup_steps = int(warmup_steps)
        super().__init__(optimizer, last_epoch=last_epoch)

    def lrs_at(self, step: int) -> list[float]:
        """Learning rate of every param group after `step` scheduler steps."""
        if step >= self.warmup_steps:
            return [float(base) for base in self.base_lrs]
        fraction = (step + 1) / (self.warmup_steps + 1)
        return [self.initial_lr + fraction * (float(base) - self.initial_lr) for base in self.base_lrs]

    def get_lr(self) -> list[float]:
        """Closed-form rates for the current `last_epoch` (torch's hook)."""
        return self.lrs_at(self.last_epoch)


class CosineAnnealingWarmupLR(LRScheduler):
    """Linear warmup from 0 (same ramp as `LinearWarmupLR`), then half a cosine down to `eta_min`.

    The cosine spans steps [warmup_steps, total_steps]; after total_steps the rate stays at eta_min. `refit` moves
    the end while training (a time budget re-estimating its step count) without the rate ever rising again.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ):
        _check_warmup_steps(warmup_steps)
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if warmup_steps > total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) cannot exceed total_steps ({total_steps})")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.eta_min = float(eta_min)
        self.anchor: tuple[int, float] | None = None  # (step, cosine progress there) after a refit
        super().__init__(optimizer, last_epoch=last_epoch)

    def progress(self, step: int) -> float:
        """How far along the cosine `step` is, 0 to 1 (0 during the warmup)."""
        if step < self.warmup_steps:
            return 0.0
        start, done = self.anchor if self.anchor is not None else (self.warmup_steps, 0.0)
        span = max(1, self.total_steps - start)
        return min(1.0, done + (1.0 - done) * max(0, step - start) / span)

    def refit(self, total_steps: int) -> None:
        """End the cosine at `total_steps` from now on: what is left of it is spread over the steps left, so the
        rate goes on from where it is. (Setting `total_steps` alone re-reads the whole cosine: a run whose end was
        pulled in by a slow spell would see its rate climb back when the end moved out again.)"""
        step = self.last_epoch
        if step >= self.warmup_steps:
            self.anchor = (step, self.progress(step))
        self.total_steps = max(int(total_steps), step + 1)

    def lrs_at(self, step: int) -> list[float]:
        """Learning rate of every param group after `step` scheduler steps."""
        if step < self.warmup_steps:
            fraction = (step + 1) / (self.warmup_steps + 1)
            return [fraction * float(base) for base in self.base_lrs]
        weight = 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))
        return [self.eta_min + weight * (float(base) - self.eta_min) for base in self.base_lrs]

    def get_lr(self) -> list[float]:
        """Closed-form rates for the current `last_epoch` (torch's hook)."""
        return self.lrs_at(self.last_epoch)


def create_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    num_steps_per_epoch: int,
    epochs: int = 1000,
    warmup_steps: int | None = None,
    use_cosine_scheduler: bool = False,
    initial_lr: float = 1e-6,
    eta_min: float = 0.0,
) -> LRScheduler | None:
    """None without warmup or cosine; cosine (to `eta_min`) over epochs·steps if asked; else `LinearWarmupLR`."""
    if use_cosine_scheduler:
        if num_steps_per_epoch <= 0 or epochs <= 0:
            raise ValueError("a cosine schedule needs positive num_steps_per_epoch and epochs")
        return CosineAnnealingWarmupLR(
            optimizer, total_steps=num_steps_per_epoch * epochs, warmup_steps=warmup_steps or 0, eta_min=eta_min
        )
    if warmup_steps is None:
        return None
    return LinearWarmupLR(optimizer, initial_lr=initial_lr, warmup_steps=warmup_steps)


def create_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-15,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (Open-Sora's defaults: wd 0, eps 1e-15)."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def set_lr(
    optimizer: torch.optim.Optimizer,
    lr_scheduler: LRScheduler | None,
    lr: float,
    initial_lr: float | None = None,
) -> None:
    """Override the base learning rate (e.g. after resuming with a new config), keeping the schedule's position."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr
    if lr_scheduler is None:
        return
    lr_scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    if initial_lr is not None and hasattr(lr_scheduler, "initial_lr"):
        lr_scheduler.initial_lr = float(initial_lr)
    _apply_current_lrs(optimizer, lr_scheduler)


def set_eps(optimizer: torch.optim.Optimizer, eps: float | None = None) -> None:
    """Override Adam's epsilon in every param group; None leaves it unchanged."""
    if eps is None:
        return
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    for group in optimizer.param_groups:
        group["eps"] = eps


def set_warmup_steps(lr_scheduler: LRScheduler | None, warmup_steps: int) -> None:
    """Override a warmup scheduler's warmup length (e.g. to restart warmup on resume)."""
    _check_warmup_steps(warmup_steps)
    if lr_scheduler is None:
        return
    if not hasattr(lr_scheduler, "warmup_steps"):
        raise ValueError(f"{type(lr_scheduler).__name__} has no warmup to change")
    lr_scheduler.warmup_steps = int(warmup_steps)
    _apply_current_lrs(lr_scheduler.optimizer, lr_scheduler)


def _apply_current_lrs(optimizer: torch.optim.Optimizer, lr_scheduler: LRScheduler) -> None:
    """Recompute the rates in force now, so an override applies to the very next step."""
    if not hasattr(lr_scheduler, "lrs_at"):
        return
    lrs = lr_scheduler.lrs_at(lr_scheduler.last_epoch)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    lr_scheduler._last_lr = list(lrs)


def _check_warmup_steps(warmup_steps: int) -> None:
    if warmup_steps is None or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps}")
