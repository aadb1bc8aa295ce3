"""What to quantize and how: the options of `Engine.from_pretrained(..., quantize=...)` and `--quantize`."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

from ..errors import ConfigError

DEFAULT_GROUP = {8: -1, 4: 128}  # int8 per output channel; int4 in groups of 128 input columns


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only round-to-nearest quantization of a model's linear layers."""

    bits: int = 8  # 8 or 4
    group_size: int = -1  # input columns sharing one scale: -1 = the whole row (per output channel), else 32/64/128...
    symmetric: bool = True  # True: zero point fixed (0 for int8, 8 for int4); False: a zero point per group
    lm_head: bool = True  # quantize the LM head (and, when tied to it, the token embeddings)
    embeddings: bool = True  # quantize untied token embeddings (a lookup reads one row: this saves memory, not time)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.group_size != -1 and (self.group_size < 2 or self.group_size % 2):
            raise ConfigError(f"quantization group_size must be -1 or an even number >= 2, got {self.group_size}")

    @classmethod
    def parse(cls, spec: Union[None, str, "QuantConfig", dict], **overrides) -> Optional["QuantConfig"]:
        """None, a QuantConfig, a dict of its fields, or "int8" / "int4" / "int4-g32" / "int8-asym" style
        names; keyword overrides (group_size=..., symmetric=...) apply last. None/"none" -> None."""
        if spec is None or spec == "none":
            if any(v is not None for v in overrides.values()):
                raise ConfigError(f"quantization options {sorted(k for k, v in overrides.items() if v is not None)} "
                                  "given without quantize=")
            return None
        if isinstance(spec, QuantConfig):
            base = asdict(spec)
        elif isinstance(spec, dict):
            base = dict(spec)
        elif isinstance(spec, str):
            parts = spec.lower().split("-")
            if parts[0] not in ("int8", "int4"):
                raise ConfigError(f"unknown quantization {spec!r}: expected int8 or int4 (optionally -g32/-g64/-g128, -asym)")
            bits = int(parts[0][3:])
            base = {"bits": bits, "group_size": DEFAULT_GROUP[bits]}
            for p in parts[1:]:
                if p == "asym":
                    base["symmetric"] = False
                elif p == "sym":
                    base["symmetric"] = True
                elif p.startswith("g") and p[1:].isdigit():
                    base["group_size"] = int(p[1:])
                else:
                    raise ConfigError(f"unknown quantization option {p!r} in {spec!r}")
        else:
            raise ConfigError(f"quantize must be None, a string or a QuantConfig, got {type(spec).__name__}")
        base.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(base) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown quantization option(s) {sorted(unknown)}")
        return cls(**base)

    @property
    def name(self) -> str:
        g = "" if self.group_size == -1 else f"-g{self.group_size}"
        return f"int{self.bits}{g}{'' if self.symmetric else '-asym'}"
