"""What a lever is: the `Lever` declaration and the types it speaks in (its fields, what it offers the search, its
bench rows), shared by every lever module and by the table (qwendoctor.levers).

This module and the lever modules never import `qwendoctor.profile` at import time: the Profile dataclass is made
from the fields the levers declare, so the levers come first and the profile after them (see `BenchRow`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping

from qwendoctor.errors import UsageError

if TYPE_CHECKING:
    from qwendoctor.capabilities import Capabilities
    from qwendoctor.profile import Profile, Workload


@dataclasses.dataclass(frozen=True)
class Field:
    """One Profile field. `choices` for names; `low` for numbers (inclusive); `optional`: None is allowed."""

    name: str
    kind: type
    default: Any
    choices: tuple | None = None
    low: float | None = None
    optional: bool = False
    # Left out of a lock when at its default, so older locks and their readers are unchanged by the field.
    omit_default: bool = False


@dataclasses.dataclass(frozen=True)
class IntRange:
    """An integer search dimension: low..high by step."""

    low: int
    high: int
    step: int

    def __str__(self) -> str:
        return f"{self.low}..{self.high} by {self.step}"


@dataclasses.dataclass(frozen=True)
class Offer:
    """What the search space offers of one lever on this machine: values per field, and what it left out."""

    values: dict[str, tuple | IntRange]
    left_out: tuple[str, ...] = ()
    # Lever-specific facts its `sample` reads (whether FP8 is searched without compile, say).
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SpaceContext:
    """What a lever's offer may look at: the probed machine, the workload, `--exhaustive`, and the measured
    reasons to leave a choice out (`evidence(rule)`: a sentence naming this GPU model's measurement, or None
    when this GPU model was not measured, and then the choice stays in the space)."""

    capabilities: "Capabilities"
    workload: "Workload"
    exhaustive: bool
    evidence: Callable[[str], str | None]
    # The model draws what it is asked (trained weights): only then does quality against the reference judge a
    # lossy setting. Random weights draw noise, and PSNR/SSIM on noise speak for numerical fidelity alone.
    draws: bool = True
    blocks: int | None = None  # the transformer's blocks (60 in Qwen-Image), where the model's config says

    @property
    def on_gpu(self) -> bool:
        return self.capabilities.device == "cuda"

    @property
    def can_compile(self) -> bool:
        return self.on_gpu and self.capabilities.compile_works is not False


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One row of the bench's "alone" group: the lever by itself against the default."""

    id: str
    label: str
    changes: Mapping[str, Any]  # the fields this row sets; every other one at its default

    @property
    def profile(self) -> "Profile":
        # At call time, never at import: Profile is made from the lever table, which imports the lever modules
        # that declare these rows (the one edge back from the levers to qwendoctor.profile, and a run-time one).
        from qwendoctor.profile import Profile

        return Profile(**self.changes)


@dataclasses.dataclass(frozen=True)
class LadderStep:
    """One step of the bench's cumulative stack. `order` is the ladder's, not the table's: cheap lossless levers
    first, so each later one is judged against the best stack without it, and FP8 last."""

    order: int
    id: str
    label: str
    change: Callable[["Profile"], "Profile"]
    applies: Callable[["Capabilities", "Workload"], bool]


def runs_true_cfg(workload: "Workload | None", profile: "Profile") -> bool:
    """Whether each step runs true CFG's two passes: the workload asks for CFG (None: assume it does) and no
    distilled adapter, which runs with CFG off (levers.distilled), replaces it."""
    return (workload is None or workload.does_cfg) and not getattr(profile, "distilled", False)


def nothing(*_args) -> None:
    return None


def has_transformer(pipe, profile: "Profile", field: str, asked: bool) -> bool:
    """Whether a lever that changes the transformer has one to change. A pipeline built without one (encode-only,
    transformer=None) leaves such a lever nothing to do at its default, and refuses it when asked for: skipping
    it would hand back a pipeline that is not what the profile says."""
    if pipe.transformer is not None:
        return True
    if asked:
        raise UsageError(f"profile.{field} = {getattr(profile, field)!r} changes the pipeline's transformer, and "
                         "this pipeline has none (transformer=None)")
    return False


def fuse_modules(pipe, profile: "Profile", field: str, fuse, is_fused, what: str):
    """A fusion lever's apply (`fuse(transformer) -> count`, `is_fused(module)`: its mechanism). At the default
    nothing is done: fused modules are not unfused (undoable=False), the pool replaces the transformer."""
    if not getattr(profile, field) or not has_transformer(pipe, profile, field, True):
        return pipe
    already = any(is_fused(module) for module in pipe.transformer.modules())
    if fuse(pipe.transformer) == 0 and not already:
        raise UsageError(f"profile.{field}: this transformer has no {what} to fuse")
    return pipe


@dataclasses.dataclass(frozen=True)
class Lever:
    """One optimization: its `apply(pipe, profile) -> pipe` and everything else qwendoctor needs to know about it
    (what each attribute means: qwendoctor.levers). A lever module declares one (or a tight family, which shares
    fields) beside its mechanism; the table lists it in LEVERS."""

    name: str
    apply: Callable[[Any, "Profile"], Any] | None  # None: not a change to the pipeline (steps)
    undoable: bool
    fields: tuple[Field, ...] = ()
    check: Callable[["Profile"], None] = nothing
    runnable: Callable[["Profile", "Workload", "Capabilities"], None] = nothing
    offer: Callable[[SpaceContext], Offer] | None = None  # None: not searched by tune
    sample: Callable[[Any, Offer, dict[str, Any], SpaceContext], dict[str, Any]] | None = None
    # A compiled graph (or a parallel hook) depends on every other lever it traced: once this is applied, the
    # whole profile but its steps is what the transformer carries (qwendoctor.pool).
    captures_profile: bool = False
    # Its state lives in pipeline components besides the transformer (accelerate's offload hooks, where the text
    # encoder is): a lever of this kind that cannot be undone needs a new pipeline, not a new transformer.
    pipeline_wide: bool = False
    lossy: Callable[["Profile"], bool] = lambda profile: False
    # Fingerprint fields (qwendoctor.fingerprint) a setting depends on beyond torch and diffusers: a lock whose
    # profile uses the lever is stale when they change, one that does not use it is not.
    packages: Callable[["Profile"], tuple[str, ...]] = lambda profile: ()
    describe: Callable[["Profile"], str | None] = nothing
    bench_alone: Callable[["Capabilities", "Workload"], list[BenchRow]] = lambda c, w: []
    ladder: tuple[LadderStep, ...] = ()

    def is_on(self, profile: "Profile") -> bool:
        return any(getattr(profile, f.name) != f.default for f in self.fields)
