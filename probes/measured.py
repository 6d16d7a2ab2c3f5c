"""What qwendoctor measured, per GPU model, read from probes/measured.toml.

Figures measured on one card used to be written into probes' messages and the tuner's rules as if they held on
every GPU. They live in the data file instead, each with the card it was measured on and the benchmarks/ file
that holds it, so a message can say where a number comes from, and say so plainly when this GPU was never
measured. GPU names match exactly, after whitespace and case are normalised: an "NVIDIA H100 PCIe" is not an
"NVIDIA H100 80GB HBM3".
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from pathlib import Path
from typing import Any, Mapping

DATA_FILE = Path(__file__).with_name("measured.toml")
DATA_LABEL = "probes/measured.toml"  # how messages name it


@functools.lru_cache(maxsize=None)
def load() -> Mapping[str, Mapping[str, Any]]:
    """GPU name (as torch.cuda.get_device_name / NVML report it) -> its table of figures."""
    with open(DATA_FILE, "rb") as fh:
        return tomllib.load(fh).get("gpu", {})


def normalise(gpu_name: str) -> str:
    return " ".join(str(gpu_name).split()).casefold()


def measured_gpus() -> list[str]:
    return list(load())


def for_gpu(gpu_name: str | None) -> dict[str, Any]:
    """This GPU's figures; empty when it was never measured (or there is no GPU)."""
    if not gpu_name:
        return {}
    wanted = normalise(gpu_name)
    return next((dict(table) for name, table in load().items() if normalise(name) == wanted), {})


def _entry(table: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    """The entry at dotted `key` ("dominated.max-autotune"): a table with a value or values."""
    node: Any = table
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Mapping) and ("value" in node or "values" in node) else None


def figure(gpu_name: str | None, key: str) -> dict[str, Any] | None:
    """The entry `key` measured on this GPU (value/values, unit, what, date, source), None when not measured."""
    entry = _entry(for_gpu(gpu_name), key)
    return dict(entry) if entry is not None else None


def _render(values: Any) -> str:
    if isinstance(values, Mapping):
        return ", ".join(f"{name} {_render(value)}" for name, value in values.items())
    if isinstance(values, (list, tuple)):
        return " vs ".join(_render(value) for value in values)
    return f"{values:g}" if isinstance(values, float) else str(values)


@dataclasses.dataclass(frozen=True)
class Figure:
    """One entry, with the card it was measured on and the GPU it was asked for."""

    key: str
    gpu: str  # the card it was measured on
    asked: str | None  # the GPU the caller runs on (None: no GPU)
    data: Mapping[str, Any]

    @property
    def here(self) -> bool:
        return bool(self.asked) and normalise(self.asked) == normalise(self.gpu)

    @property
    def values(self) -> Any:
        return self.data["values"] if "values" in self.data else self.data["value"]

    @property
    def unit(self) -> str:
        return str(self.data.get("unit", ""))

    @property
    def what(self) -> str:
        return str(self.data.get("what", self.key))

    @property
    def source(self) -> str | None:
        return self.data.get("source")

    @property
    def cite(self) -> str:
        """The source file, or why there is none."""
        return self.source or f"no committed source: {self.data.get('unsourced', 'not recorded')}"

    def where(self) -> str:
        """'measured on <card> (<source>)', or, for another card's figure, 'not measured on <this GPU>; on
        <card> (<source>)': the prefix of any sentence that quotes it."""
        if self.here:
            return f"measured on {self.gpu} ({self.cite})"
        return f"not measured on {_this(self.asked)}; on {self.gpu} ({self.cite})"


def _this(gpu_name: str | None) -> str:
    return gpu_name or "this machine (no GPU)"


def nearest(gpu_name: str | None, key: str) -> Figure | None:
    """This GPU's figure when it was measured here, else the first card's in the file that has it (its
    `here` is then False, so the caller labels it); None when no card has it."""
    mine = figure(gpu_name, key)
    if mine is not None:
        gpu = next(name for name in load() if normalise(name) == normalise(gpu_name))
        return Figure(key, gpu, gpu_name, mine)
    for name, table in load().items():
        entry = _entry(table, key)
        if entry is not None:
            return Figure(key, name, gpu_name, dict(entry))
    return None


def describe(gpu_name: str | None, key: str) -> str:
    """'measured on NVIDIA H100 80GB HBM3: <what>: <values> <unit> (benchmarks/...)'; for a GPU the file does
    not cover, 'not measured on <GPU>; measured on <card>: ...'."""
    fig = nearest(gpu_name, key)
    if fig is None:
        return f"{key}: not measured on {_this(gpu_name)} nor on any GPU in {DATA_LABEL}"
    quoted = f"{fig.what}: {_render(fig.values)} {fig.unit}".rstrip()
    if fig.here:
        return f"measured on {fig.gpu}: {quoted} ({fig.cite})"
    return f"not measured on {_this(gpu_name)}; measured on {fig.gpu}: {quoted} ({fig.cite})"


@dataclasses.dataclass(frozen=True)
class Evidence:
    """Why the tuner may leave a choice out on this GPU: what was measured, where, on which card."""

    rule: str
    why: str  # a sentence with the measured numbers
    source: str
    gpu: str

    def sentence(self) -> str:
        return f"{self.why} (measured on {self.gpu}, {self.source})"


def evidence(gpu_name: str | None, rule: str) -> Evidence | None:
    """The measurement behind leaving `rule` ("max-autotune", "coordinate-descent", "eager-fp8",
    "complex-rope") out of the search on this GPU; None where this GPU was not measured."""
    fig = nearest(gpu_name, f"dominated.{rule}")
    if fig is None or not fig.here or not fig.source:
        return None
    return Evidence(rule=rule, why=str(fig.data["why"]), source=fig.source, gpu=fig.gpu)
