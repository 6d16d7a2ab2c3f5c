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
class LoRA:
    """One LoRA the workload runs with (`--lora PATH[:SCALE]`). The file's sha256 ties a lock to the adapter it was
    tuned with: another file under the same path is another workload. Reading and checking the file is
    qwendoctor.levers.lora's; this is only what a lock records."""

    path: str  # "tiny:<name>" for an adapter shipped with the tiny model, else an absolute path
    scale: float = 1.0
    sha256: str = ""
    rank: int | None = None  # from the safetensors header: the largest lora_A's rows

    def validate(self, label: str) -> "LoRA":
        if not isinstance(self.path, str) or not self.path:
            raise WorkloadError(f"{label}.path: must be a non-empty string")
        try:
            limits.check("lora_scale", self.scale, label=f"{label}.scale")
        except RangeError as error:
            raise WorkloadError(str(error)) from None
        if not (isinstance(self.sha256, str) and len(self.sha256) == 64
                and all(c in "0123456789abcdef" for c in self.sha256)):
            raise WorkloadError(f"{label}.sha256: must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.rank is not None and (not limits.ok_type(self.rank) or self.rank < 1):
            raise WorkloadError(f"{label}.rank: must be a positive integer, got {self.rank!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["rank"] is None:  # TOML has no null
            del data["rank"]
        return data


@dataclasses.dataclass(frozen=True)
class Distilled(LoRA):
    """A few-step distilled LoRA (`--distilled`, Qwen-Image-Lightning's kind): besides the file, what it must run
    with, declared by its maker, because without it a distilled adapter silently draws badly: the step counts it
    was distilled for, true CFG off, and overrides of the pipeline's scheduler config. It is a candidate of the
    search (the `distilled` lever), never part of the reference: the floor judges it against the base model."""

    steps: tuple[int, ...] = ()
    # (key, value) pairs, sorted: overrides of the scheduler's config; a None value sets the key to None
    # (Lightning's shift_terminal). A tuple, not a dict, so the frozen workload stays hashable.
    scheduler: tuple[tuple[str, Any], ...] = ()

    @property
    def scheduler_overrides(self) -> dict[str, Any]:
        return dict(self.scheduler)

    def as_lora(self) -> LoRA:
        return LoRA(path=self.path, scale=self.scale, sha256=self.sha256, rank=self.rank)

    def validate(self, label: str) -> "Distilled":
        super().validate(label)
        if (not isinstance(self.steps, tuple) or not self.steps
                or not all(limits.ok_type(s) and s >= MIN_STEPS for s in self.steps)):
            raise WorkloadError(f"{label}.steps: must be a non-empty list of step counts >= {MIN_STEPS}, got "
                                f"{list(self.steps) if isinstance(self.steps, tuple) else self.steps!r}")
        if not isinstance(self.scheduler, tuple) or not all(
                isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                and (pair[1] is None or isinstance(pair[1], (bool, int, float, str))) for pair in self.scheduler):
            raise WorkloadError(f"{label}.scheduler: must map config names to numbers, strings, booleans or "
                                "null")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = self.as_lora().to_dict()
        data["steps"] = list(self.steps)
        # TOML has no null: the keys set to None are listed apart.
        data["scheduler"] = {key: value for key, value in self.scheduler if value is not None}
        data["scheduler_unset"] = [key for key, value in self.scheduler if value is None]
        return data

    @classmethod
    def from_dict(cls, entry: Any, label: str) -> "Distilled":
        if not isinstance(entry, dict):
            raise WorkloadError(f"{label}: expected a table with path, scale, sha256, steps and scheduler")
        unknown = sorted(set(entry) - {f.name for f in dataclasses.fields(cls)} - {"scheduler_unset"})
        if unknown:
            raise WorkloadError(f"{label}.{unknown[0]}: unknown field")
        for needed in ("path", "sha256", "steps"):
            if needed not in entry:
                raise WorkloadError(f"{label}: needs {needed}")
        fields = dict(entry)
        scheduler, unset = fields.pop("scheduler", {}), fields.pop("scheduler_unset", [])
        if not isinstance(scheduler, dict) or not isinstance(unset, list) or not all(
                isinstance(key, str) for key in unset):
            raise WorkloadError(f"{label}.scheduler: must be a table, and scheduler_unset a list of names")
        if not isinstance(fields["steps"], list):
            raise WorkloadError(f"{label}.steps: must be a list of step counts")
        fields["steps"] = tuple(fields["steps"])
        fields["scheduler"] = scheduler_pairs({**scheduler, **{key: None for key in unset}})
        return cls(**fields).validate(label)


def scheduler_pairs(overrides: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(overrides.items()))


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
    loras: tuple[LoRA, ...] = ()
    # A few-step distilled LoRA the search may run instead of the base's steps and CFG (`--distilled`).
    distilled: Distilled | None = None
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
        if not isinstance(self.loras, tuple) or not all(isinstance(lora, LoRA) for lora in self.loras):
            raise WorkloadError("workload.loras: must be LoRA entries (path, scale, sha256)")
        for index, lora in enumerate(self.loras):
            lora.validate(f"workload.loras[{index}]")
        if self.distilled is not None:
            if not isinstance(self.distilled, Distilled):
                raise WorkloadError("workload.distilled: must be a distilled LoRA entry")
            self.distilled.validate("workload.distilled")
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
        data["loras"] = [lora.to_dict() for lora in self.loras]
        if data["memory_limit_gib"] is None:  # TOML has no null; and locks without a limit stay as they were
            del data["memory_limit_gib"]
        if self.distilled is None:
            del data["distilled"]
        else:
            data["distilled"] = self.distilled.to_dict()
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
            fields["loras"] = tuple(_lora_from_dict(entry, f"workload.loras[{index}]")
                                    for index, entry in enumerate(fields["loras"]))
        if "distilled" in fields:
            fields["distilled"] = Distilled.from_dict(fields["distilled"], "workload.distilled")
        return cls(**fields).validate()


def _lora_from_dict(entry: Any, label: str) -> LoRA:
    if not isinstance(entry, dict):
        raise WorkloadError(f"{label}: expected a table with path, scale and sha256, got {entry!r}")
    unknown = sorted(set(entry) - {f.name for f in dataclasses.fields(LoRA)})
    if unknown:
        raise WorkloadError(f"{label}.{unknown[0]}: unknown field")
    if "path" not in entry or "sha256" not in entry:
        raise WorkloadError(f"{label}: needs path and sha256")
    return LoRA(**entry).validate(label)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
