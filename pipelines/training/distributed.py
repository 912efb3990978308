"""A small training engine over `torch.distributed` that runs everywhere (CPU/gloo, GPU/NCCL).

Launch with `torchrun`; without `WORLD_SIZE` in the environment everything runs in one process.
Backends: "none" (plain module), "ddp" (DistributedDataParallel), "fsdp" (FSDP2 `fully_shard`).
The "colossalai-*" backends live in `pipelines.training.colossal` (GPU-only, optional install);
`create_engine` dispatches to either with one interface: model, torch_optimizer, backward, step,
no_sync, master_params.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "BACKENDS",
    "DistState",
    "DistributedConfig",
    "TorchEngine",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "collective_device",
    "cleanup",
    "create_engine",
    "is_main_process",
    "setup_distributed",
    "unwrap_model",
    "wrap_model",
]

BACKENDS = ("none", "ddp", "fsdp", "colossalai-zero1", "colossalai-zero2", "colossalai-hybrid")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Wrapper classes whose inner module sits in an attribute (checked by name: no eager imports).
_WRAPPERS = {"DistributedDataParallel": "module", "DataParallel": "module", "OptimizedModule": "_orig_mod"}


@dataclass
class DistributedConfig:
    """How the model is replicated or sharded across processes."""

    backend: str = "none"
    dtype: str = "fp32"  # FSDP2 param dtype for compute / ColossalAI precision ("fp32", "bf16", "fp16")
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    find_unused_parameters: bool = False  # DDP: needed when some parameters get no grad
    reshard_after_forward: bool = True  # FSDP2: free gathered params after forward (saves memory)
    plugin_config: dict[str, Any] = field(default_factory=dict)  # extra ColossalAI plugin kwargs

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown distributed backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(_DTYPES)}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class DistState:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def setup_distributed(timeout_minutes: float = 30.0) -> DistState:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); one process if WORLD_SIZE is unset."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return DistState(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"), True)
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"WORLD_SIZE is set but the torchrun variables are incomplete or invalid: {exc}") from exc
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Naming the GPU binds NCCL to it (barriers otherwise guess the device from the rank).
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if cuda else None)
    return DistState(rank, world_size, local_rank, device, rank == 0)


def is_main_process() -> bool:
    """True on rank 0, and in any single-process run."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Wait for every rank, then leave the process group (if one was joined)."""
    if dist.is_initialized():
        # Without the barrier a rank that leaves early can abort a peer still talking to it (gloo).
        dist.barrier()
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """Where tensors must be for collectives: the current GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over ranks in place and return it; a CPU tensor works under NCCL too (reduced on the GPU,
    copied back)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        work = tensor.to(collective_device())
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Average `tensor` over ranks in place and return it (e.g. a loss for logging)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        all_reduce_sum(tensor).div_(dist.get_world_size())
    return tensor


def all_reduce_min(value: int) -> int:
    """The smallest of every rank's `value` (itself in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module inside DDP / torch.compile / ColossalAI wrappers (FSDP2 shards in place)."""
    if type(model).__module__.startswith("colossalai") and hasattr(model, "unwrap"):
        return model.unwrap()
    while type(model).__name__ in _WRAPPERS:
        model = getattr(model, _WRAPPERS[type(model).__name__])
    return model


def wrap_model(model: nn.Module, cfg: DistributedConfig, state: DistState) -> nn.Module:
    """Move `model` to this rank's device and wrap it for `cfg.backend` ("none", "ddp" or "fsdp")."""
    if cfg.backend.startswith("colossalai"):
        raise ValueError(f"backend {cfg.backend!r} boosts model and optimizer together: use create_engine")
    model = model.to(state.device)
    if cfg.backend == "none":
        return model
    if not dist.is_initialized():
        raise ValueError(
            f"backend {cfg.backend!r} needs a process group: launch with torchrun and call setup_distributed"
        )
    if cfg.backend == "ddp":
        device_ids = [state.device.index] if state.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=cfg.find_unused_parameters
        )
    return _shard_model(model, cfg, state)


def _shard_model(model: nn.Module, cfg: DistributedConfig, state: DistState) -> nn.Module:
    """FSDP2: shard each block from `model.blocks_to_shard()` (if defined), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(state.device.type, (state.world_size,))
    mp_policy = MixedPrecisionPolicy()
    if cfg.dtype != "fp32":
        # Compute in low precision but reduce gradients in fp32, so sharded masters stay precise.
        mp_policy = MixedPrecisionPolicy(param_dtype=_DTYPES[cfg.dtype], reduce_dtype=torch.float32)
    options = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward, "mp_policy": mp_policy}
    blocks = getattr(model, "blocks_to_shard", None)
    for block in blocks() if callable(blocks) else ():
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


class TorchEngine:
    """Owns the wrapped model and its optimizer: backward, clip, step, zero_grad."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: DistributedConfig, state: DistState):
        self.model = model
        self.optimizer = optimizer
        self.cfg = cfg
        self.state = state

    @property
    def unwrapped_model(self) -> nn.Module:
        """The bare module (its parameter names match the checkpoint's)."""
        return unwrap_model(self.model)

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The `torch.optim.Optimizer` to build LR schedulers on."""
        return self.optimizer

    def backward(self, loss: Tensor) -> None:
        """Backpropagate `loss` (gradients are averaged over ranks by DDP/FSDP)."""
        loss.backward()

    def step(self) -> float | None:
        """Clip (if configured), take an optimizer step, clear grads; return the pre-clip grad norm."""
        norm = None
        if self.cfg.grad_clip > 0:
            total = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip the gradient all-reduce for accumulation micro-steps (all but the last)."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            with self.model.no_sync():
                yield
        elif hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            yield

    def master_params(self) -> dict[str, Tensor] | None:
        """None: torch's AdamW updates the parameters themselves (no separate fp32 masters)."""
        return None


def create_engine(
    model: nn.Module,
    cfg: DistributedConfig,
    state: DistState,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-15,
) -> Any:
    """Wrap `model` for `cfg.backend` and build its optimizer; returns a TorchEngine or ColossalEngine."""
    if cfg.backend.startswith("colossalai"):
        from pipelines.training.colossal import ColossalEngine

        return ColossalEngine(model, cfg, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    from pipelines.training.lr_schedulers import create_optimizer

    # The optimizer is built after wrapping: FSDP2 replaces parameters with sharded DTensors.
    wrapped = wrap_model(model, cfg, state)
    optimizer = create_optimizer(wrapped, lr, weight_decay=weight_decay, betas=betas, eps=eps)
    return TorchEngine(wrapped, optimizer, cfg, state)
