"""Architecture configs read from upstream-style dicts (the field names of Open-Sora's configs and golden files)."""

from __future__ import annotations

from dataclasses import fields

# Keys that only matter to upstream's own loader, registry or kernels; accepted and dropped.
UPSTREAM_LOADER_FIELDS = frozenset({"from_pretrained", "cache_dir", "type", "strict_load", "torch_dtype",
                                    "device_map"})


class UpstreamConfig:
    """Mixin for frozen dataclass configs: `from_dict` refuses unknown keys, lists become tuples, and back."""

    KIND = "model"

    @classmethod
    def from_dict(cls, config: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(config) - known - UPSTREAM_LOADER_FIELDS
        if unknown:
            raise ValueError(f"unknown {cls.KIND} config fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known})

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}
