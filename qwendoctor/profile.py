"""Profile (how to run) and the rules for running it: the single description of a configuration.

The tuner samples a Profile, the lockfile stores it, `generate` applies it. Its fields are the levers' own
(qwendoctor.levers: each lever declares its fields, checks and needs there); this module makes the frozen
dataclass from them and runs every check, so a bad configuration is refused before any weights load. What is
being generated is the Workload (probes.workload), re-exported here.

The dependency runs one way: this module imports the lever table, and no lever module imports this one at import
time (tests/test_import_graph.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from probes.workload import MIN_STEPS, PIXELS_MULTIPLE, Workload, WorkloadError  # noqa: F401 (re-exported)
from qwendoctor import levers
from qwendoctor.capabilities import Capabilities  # noqa: F401 (re-exported)
from qwendoctor.errors import UsageError

FIELDS_BY_NAME = {field.name: field for field in levers.FIELDS}


class _ProfileMethods:
    """Behaviour of the Profile dataclass, whose fields come from the lever table."""

    def validate(self) -> "Profile":
        for field in levers.FIELDS:
            _check_field(field, getattr(self, field.name))
        for lever in levers.LEVERS:
            lever.check(self)
        return self

    @property
    def cfg_degree(self) -> int:
        """GPUs the CFG passes are split over: 2 for the cfg strategies, else 1."""
        return 2 if self.parallel.startswith("cfg") else 1

    @property
    def context_degree(self) -> int:
        """GPUs one transformer pass's sequence is split over (Ulysses or ring); 1 without context parallelism."""
        return self.gpus // self.cfg_degree

    def describe(self) -> str:
        return " ".join(part for lever in levers.LEVERS if (part := lever.describe(self)))

    def to_dict(self) -> dict[str, Any]:
        return {field.name: value for field in levers.FIELDS
                if (value := getattr(self, field.name)) is not None
                and not (field.omit_default and value == field.default)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profile":
        if not isinstance(data, dict):
            raise UsageError("profile: expected a table")
        unknown = sorted(set(data) - set(FIELDS_BY_NAME))
        if unknown:
            raise UsageError(f"profile.{unknown[0]}: unknown field")
        return cls(**data).validate()

    @classmethod
    def from_text(cls, text: str) -> "Profile":
        """`compile=regional,cfg_batching=true,steps=30`, as typed on a command line."""
        data: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key:
                raise UsageError(f"profile {text!r}: expected name=value pairs separated by commas, got {part!r}")
            field = FIELDS_BY_NAME.get(key)
            if field is None:
                raise UsageError(f"profile.{key}: unknown field")
            data[key] = _parse_value(field, value)
        return cls.from_dict(data)


Profile = dataclasses.make_dataclass(
    "Profile", [(f.name, f.kind | None if f.optional else f.kind, dataclasses.field(default=f.default))
                for f in levers.FIELDS],
    bases=(_ProfileMethods,), frozen=True)
Profile.__module__ = __name__  # so it pickles (Python 3.12 has make_dataclass(module=); 3.11 does not)
Profile.__doc__ = ("How to run Qwen-Image, one field per lever setting (qwendoctor.levers). The defaults are "
                   "diffusers' defaults: the reference everything is measured against.")


def _check_field(field: levers.Field, value: Any) -> None:
    name = f"profile.{field.name}"
    if value is None and field.optional:
        return
    if field.choices is not None:
        if value not in field.choices:
            raise UsageError(f"{name}: {value!r} is not one of {', '.join(map(str, field.choices))}")
    elif field.kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{name}: expected true or false, got {value!r}")
    elif field.kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or (field.low is not None and value < field.low):
            raise UsageError(f"{name}: must be an integer >= {field.low:g}, got {value!r}")
        _in_range(name, field.name if field.name in ("steps", "gpus") else "profile_int", value)
    elif field.kind is float:
        # The finer ranges are the owning lever's (cache_threshold's depends on other fields); NaN and inf, which
        # pass every comparison or none, are refused here for all of them.
        _in_range(name, "profile_float", value)


def _in_range(name: str, limit: str, value: Any) -> None:
    from probes import limits

    try:
        limits.check(limit, value, label=name + ":")
    except limits.RangeError as error:
        raise UsageError(str(error)) from None


def _parse_value(field: levers.Field, value: str) -> Any:
    if field.kind is bool:
        if value.lower() not in ("true", "false"):
            raise UsageError(f"profile.{field.name}: expected true or false, got {value!r}")
        return value.lower() == "true"
    if field.kind in (int, float):
        try:
            return field.kind(value)
        except ValueError:
            raise UsageError(f"profile.{field.name}: expected a number, got {value!r}") from None
    return value


def check_runnable(profile: Profile, workload: Workload, capabilities: Capabilities) -> None:
    """Raise if this machine cannot run `profile` on `workload`; called before the pipeline is built."""
    profile.validate()
    workload.validate()
    for lever in levers.LEVERS:
        lever.runnable(profile, workload, capabilities)
