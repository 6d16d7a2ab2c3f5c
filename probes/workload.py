"""Workload: what is being generated. The one description of it that probes size their measurements for, the
tuner tunes for and a lock is valid for; it lives here, below qwendoctor/, so that probes need nothing above them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from probes import limits
from probes.limits import PIXELS_MULTIPLE, RangeError

MIN_STEPS = int(limits.RANGES["steps"].low)
DTYPES = ("bfloat16", "float32")


class WorkloadError(RangeError):
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
        try:
            # A lock's numbers get the same ranges as the options that wrote them (probes.limits).
            for name in ("width", "height"):
                limits.check(name, getattr(self, name))
            limits.check("steps", self.reference_steps)
            limits.check("true_cfg_scale", self.true_cfg_scale)
        except RangeError as error:
            raise WorkloadError(str(error)) from None
        if not isinstance(self.negative_prompt, str):
            raise WorkloadError("workload.negative_prompt: must be a string")
        if self.dtype not in DTYPES:
            raise WorkloadError(f"workload.dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.memory_limit_gib is not None and (not _is_number(self.memory_limit_gib)
                                                  or not 0 < self.memory_limit_gib
                                                  <= limits.RANGES["memory_limit"].high):
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



def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
