"""Workload: what is being generated. The one description of it that probes size their measurements for, the
tuner tunes for and a lock is valid for; it lives here, below qwendoctor/, so that probes need nothing above them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

PIXELS_MULTIPLE = 16  # VAE downsamples by 8, then the transformer packs 2x2 patches
# Qwen-Image's scheduler stretches sigmas to shift_terminal with (1 - sigma) / (1 - last sigma): 0/0 at one step.
MIN_STEPS = 2
DTYPES = ("bfloat16", "float32")


class WorkloadError(ValueError):
    """A workload value out of range; the message names the field. The CLI reports it as a usage error."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """What is being generated; a lock is only valid for the workload it was tuned on."""

    model: str = "tiny"
    width: int = 1328
    height: int = 1328
    true_cfg_scale: float = 4.0
    negative_prompt: str = " "
    reference_steps: int = 50
    dtype: str = "bfloat16"
    loras: tuple[str, ...] = ()
    # GiB of GPU memory the process may use (`--memory-limit`); None: the whole card.
    memory_limit_gib: float | None = None

    def validate(self) -> "Workload":
        if not isinstance(self.model, str) or not self.model:
            raise WorkloadError("workload.model: must be a non-empty string")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0 or value % PIXELS_MULTIPLE:
                raise WorkloadError(f"{name} must be a positive multiple of {PIXELS_MULTIPLE}, got {value!r}")
        if not _is_int(self.reference_steps) or self.reference_steps < MIN_STEPS:
            raise WorkloadError(f"steps must be an integer >= {MIN_STEPS} (the scheduler yields NaN at 1), "
                                f"got {self.reference_steps!r}")
        if not _is_number(self.true_cfg_scale) or self.true_cfg_scale < 1:
            raise WorkloadError(f"true_cfg_scale must be >= 1 (1 turns CFG off), got {self.true_cfg_scale!r}")
        if not isinstance(self.negative_prompt, str):
            raise WorkloadError("workload.negative_prompt: must be a string")
        if self.dtype not in DTYPES:
            raise WorkloadError(f"workload.dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.memory_limit_gib is not None and (not _is_number(self.memory_limit_gib)
                                                  or not self.memory_limit_gib > 0
                                                  or self.memory_limit_gib == float("inf")):
            raise WorkloadError(f"workload.memory_limit_gib: must be a positive number of GiB, got "
                                f"{self.memory_limit_gib!r}")
        if self.loras:
            # LoRA fusion is a later lever; refusing beats tuning a workload we would then run without them.
            raise WorkloadError("workload.loras: LoRAs are not supported yet")
        return self

    @property
    def does_cfg(self) -> bool:
        return self.true_cfg_scale > 1

    @property
    def image_tokens(self) -> int:
        # VAE downsamples 8x, the transformer patchifies 2x2: 1328x1328 -> 83x83 = 6889 tokens.
        return (self.height // PIXELS_MULTIPLE) * (self.width // PIXELS_MULTIPLE)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["loras"] = list(self.loras)
        if data["memory_limit_gib"] is None:  # TOML has no null; and locks without a limit stay as they were
            del data["memory_limit_gib"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Workload":
        if not isinstance(data, dict):
            raise WorkloadError("workload: expected a table")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise WorkloadError(f"workload.{unknown[0]}: unknown field")
        fields = dict(data)
        if "loras" in fields:
            if not isinstance(fields["loras"], list):
                raise WorkloadError("workload.loras: must be a list")
            fields["loras"] = tuple(fields["loras"])
        return cls(**fields).validate()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
