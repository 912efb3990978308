"""Optional ColossalAI backends (ZeRO-1/2 and hybrid TP/SP/ZeRO), for multi-GPU CUDA clusters only.

ColossalAI pins torch<=2.5.1 and transformers==4.51.3, so it cannot share the studio's
environment: install it separately with `pip install -r requirements-colossalai.txt`.
Every import of `colossalai` happens inside functions, so this module imports anywhere.
The engine mirrors `pipelines.training.distributed.TorchEngine` (model, torch_optimizer,
backward, step, no_sync, master_params) and saves/loads model and optimizer through the
Booster's own sharded checkpoint I/O.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipelines.training.distributed import DistributedConfig, unwrap_model

__all__ = ["INSTALL_HINT", "PLUGIN_DEFAULTS", "ColossalAIMissingError", "ColossalEngine", "create_colossalai_plugin"]

INSTALL_HINT = "ColossalAI backend needs `pip install -r requirements-colossalai.txt` on a CUDA machine"
# Open-Sora's plugin defaults; keys in the plugin config override them.
PLUGIN_DEFAULTS: dict[str, Any] = {
    "initial_scale": 2**16,
    "overlap_allgather": True,
    "cast_inputs": False,
    "reduce_bucket_size_in_m": 20,
}
_SHARD_SIZE_MB = 4096  # booster checkpoint shard size, as upstream


class ColossalAIMissingError(ImportError):
    """ColossalAI is not installed in this environment."""


def _import_colossalai() -> Any:
    try:
        import colossalai
    except ImportError as exc:
        raise ColossalAIMissingError(INSTALL_HINT) from exc
    return colossalai


def create_colossalai_plugin(plugin: str, dtype: str, grad_clip: float, **kwargs: Any) -> Any:
    """Build a LowLevelZeroPlugin (plugin "zero1"/"zero2") or a HybridParallelPlugin ("hybrid")."""
    if plugin not in ("zero1", "zero2", "hybrid"):
        raise ValueError(f"unknown ColossalAI plugin {plugin!r}; choose zero1, zero2 or hybrid")
    options = dict(PLUGIN_DEFAULTS, precision=dtype, max_norm=grad_clip)
    options.update(kwargs)
    _import_colossalai()
    from colossalai.booster.plugin import HybridParallelPlugin, LowLevelZeroPlugin

    if plugin in ("zero1", "zero2"):
        sp_size = options.pop("sp_size", 1)
        if sp_size != 1:
            raise ValueError(f"ZeRO plugins cannot do sequence parallelism (sp_size={sp_size}); use plugin 'hybrid'")
        return LowLevelZeroPlugin(stage=1 if plugin == "zero1" else 2, **options)
    options.setdefault("tp_size", 1)
    options.setdefault("pp_size", 1)
    # The hybrid plugin names the ZeRO bucket differently; unused params occur with conditional inputs.
    options["zero_bucket_size_in_m"] = options.pop("reduce_bucket_size_in_m")
    options.setdefault("find_unused_parameters", True)
    options["enable_metadata_cache"] = False
    policy = options.pop("custom_policy", None)
    if isinstance(policy, type):
        policy = policy()
    return HybridParallelPlugin(custom_policy=policy, **options)


class ColossalEngine:
    """Boosts model + HybridAdam with a ColossalAI Booster; same interface as TorchEngine."""

    def __init__(
        self,
        model: nn.Module,
        cfg: DistributedConfig,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-15,
    ):
        if not cfg.backend.startswith("colossalai-"):
            raise ValueError(f"ColossalEngine needs a colossalai-* backend, got {cfg.backend!r}")
        colossalai = _import_colossalai()
        if not torch.cuda.is_available():
            raise ValueError(f"{INSTALL_HINT}: no CUDA device is visible")
        from colossalai.booster import Booster
        from colossalai.nn.optimizer import HybridAdam

        if not dist.is_initialized():
            colossalai.launch_from_torch()
        self.cfg = cfg
        plugin_name = cfg.backend.removeprefix("colossalai-")
        self.plugin = create_colossalai_plugin(plugin_name, cfg.dtype, cfg.grad_clip, **cfg.plugin_config)
        self.booster = Booster(plugin=self.plugin)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
        raw = HybridAdam(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, adamw_mode=True)
        self.model, self.optimizer, *_ = self.booster.boost(model=model, optimizer=raw)
        self._raw_optimizer = raw

    @property
    def unwrapped_model(self) -> nn.Module:
        """The bare module (working weights, possibly bf16)."""
        return unwrap_model(self.model)

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The inner HybridAdam: LR schedulers act on its param groups, which the wrapper shares."""
        return self._raw_optimizer

    def backward(self, loss: Tensor) -> None:
        """Backpropagate through the booster (loss scaling, ZeRO gradient reduction)."""
        self.booster.backward(loss, self.optimizer)

    def step(self) -> float | None:
        """Optimizer step (the plugin clips to max_norm itself), clear grads; return the grad norm if known."""
        self.optimizer.step()
        norm = self.optimizer.get_grad_norm() if hasattr(self.optimizer, "get_grad_norm") else None
        self.optimizer.zero_grad()
        return None if norm is None else float(norm)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip gradient synchronisation for accumulation micro-steps, where the plugin supports it."""
        if self.plugin.support_no_sync():
            with self.booster.no_sync(self.model, self.optimizer):
                yield
        else:
            yield

    def master_params(self) -> dict[str, Tensor] | None:
        """Full fp32 master weights by parameter name, gathered from ZeRO shards (collective: all ranks call)."""
        working_to_master = self.optimizer.get_working_to_master_map()
        if not working_to_master:
            return None
        padding = self.optimizer.get_param_padding_map() if hasattr(self.optimizer, "get_param_padding_map") else {}
        group = getattr(self.plugin, "dp_group", None)
        masters = {}
        for name, param in self.unwrapped_model.named_parameters():
            shard = working_to_master.get(id(param))
            if shard is None:
                continue
            masters[name] = _gather_master(shard, param, padding.get(id(param), 0), group)
        return masters

    def save_model_and_optimizer(self, ckpt_dir: Path | str) -> None:
        """Write `model/` and `optimizer/` under `ckpt_dir` with the booster's sharded I/O (all ranks call)."""
        ckpt_dir = Path(ckpt_dir)
        self.booster.save_model(
            self.model, str(ckpt_dir / "model"), shard=True, use_safetensors=True, size_per_shard=_SHARD_SIZE_MB
        )
        self.booster.save_optimizer(
            self.optimizer, str(ckpt_dir / "optimizer"), shard=True, size_per_shard=_SHARD_SIZE_MB
        )

    def load_model_and_optimizer(self, ckpt_dir: Path | str) -> None:
        """Read `model/` and `optimizer/` written by `save_model_and_optimizer` (all ranks call)."""
        ckpt_dir = Path(ckpt_dir)
        self.booster.load_model(self.model, str(ckpt_dir / "model"))
        if (ckpt_dir / "optimizer").exists():
            self.booster.load_optimizer(self.optimizer, str(ckpt_dir / "optimizer"))


def _gather_master(shard: Tensor, param: Tensor, padding: int, group: Any) -> Tensor:
    """Reassemble a ZeRO master shard: all-gather the flat padded chunks, drop padding, reshape."""
    if shard.numel() == param.numel():
        return shard.view(param.shape)
    world = dist.get_world_size(group)
    flat = torch.empty(shard.numel() * world, dtype=shard.dtype, device=shard.device)  # (world·chunk,)
    dist.all_gather_into_tensor(flat, shard.contiguous().view(-1), group=group)
    if flat.numel() != param.numel() + padding:
        raise ValueError(f"ZeRO master shards hold {flat.numel()} values, expected {param.numel()} + {padding} padding")
    return flat[: param.numel()].view(param.shape)
