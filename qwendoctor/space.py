"""The tuner's search space: what each lever offers on this machine (qwendoctor.levers, `offer`), and a trial's
profile drawn from it (`sample`).

A choice is left out of the default space only on evidence: this machine's probes (an attention kernel its own
timing shows cannot win), the model's structure (regional vs full compile), or a measurement on this GPU model
(probes/measured.toml). A choice measured to lose on another GPU model stays in the space here. `--exhaustive`
keeps everything this machine can run. On a model with random weights, lossy settings that quality must judge
(fewer steps, caches) are not searched at all: quality on noise cannot judge them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from qwendoctor import levers, models
from qwendoctor.capabilities import Capabilities
from qwendoctor.profile import Profile, Workload


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    offers: dict[str, levers.Offer]  # lever name -> what it offers here
    context: levers.SpaceContext
    # The memory plan's levers (probes.memory_plan), the same in every trial: not searched.
    placement: dict[str, Any] = dataclasses.field(default_factory=dict)

    def values(self, field: str) -> tuple | levers.IntRange:
        """The values offered for one Profile field."""
        for offer in self.offers.values():
            if field in offer.values:
                return offer.values[field]
        raise KeyError(field)

    @property
    def left_out(self) -> tuple[str, ...]:
        """What the space leaves out and why (`--exhaustive` keeps it)."""
        return tuple(reason for offer in self.offers.values() for reason in offer.left_out)

    def describe(self) -> list[str]:
        lines = []
        for offer in self.offers.values():
            for field, values in offer.values.items():
                shown = str(values) if isinstance(values, levers.IntRange) else ", ".join(map(str, values))
                lines.append(f"{field}: {shown}")
        placed = [f"{field}: {value} (memory plan)" for field, value in self.placement.items()]
        return lines + placed + [f"left out: {reason}" for reason in self.left_out]


def measured_evidence(gpu_name: str | None) -> Callable[[str], str | None]:
    """The reasons measured on this GPU model to leave a choice out, by rule name."""
    from probes import measured

    def evidence(rule: str) -> str | None:
        found = measured.evidence(gpu_name, rule)
        return None if found is None else f"{found.why} (measured on {found.gpu}: {found.source})"

    return evidence


def build_search_space(capabilities: Capabilities, workload: Workload, exhaustive: bool = False,
                       evidence: Callable[[str], str | None] | None = None,
                       placement: dict[str, Any] | None = None) -> SearchSpace:
    """Only what this machine passed; unless `exhaustive`, less what was measured to lose here; in `placement`,
    less what cannot run with it."""
    context = levers.SpaceContext(capabilities=capabilities, workload=workload, exhaustive=exhaustive,
                                  evidence=evidence or measured_evidence(capabilities.gpu_name),
                                  draws=models.draws(workload.model),
                                  blocks=models.transformer_blocks(workload.model))
    offers = {lever.name: lever.offer(context) for lever in levers.SEARCH_ORDER}
    placement = dict(placement or {})
    if placement.get("weight_storage", "bf16") != "bf16":
        # torchao quantizes a bf16 transformer that is on the card, which is what the plan says does not fit.
        offers["quantization"] = _only(offers["quantization"], "quantization", "none",
                                       "torchao FP8 quantization: it starts from the bf16 transformer on the GPU, "
                                       "which the memory plan says does not fit (its FP8 weight storage does)")
    if placement.get("weight_storage") == "int8_weight_only":
        offers["gelu_epilogue"] = _only(offers["gelu_epilogue"], "gelu_epilogue", False,
                                        "GELU epilogue: the memory plan's int8 weights have none")
    if placement.get("offload") == "sequential":
        offers["compile"] = levers.Offer({"compile": ("none",), "compile_mode": ("default",)},
                                         offers["compile"].left_out
                                         + ("compile: sequential offload moves weights in at each call",))
    return SearchSpace(offers=offers, context=context, placement=placement)


def _only(offer: levers.Offer, field: str, value: Any, reason: str) -> levers.Offer:
    values = {**offer.values, field: (value,)}
    return dataclasses.replace(offer, values=values, left_out=offer.left_out + (reason,))


def default_params(space: SearchSpace) -> dict[str, Any]:
    """The default profile as trial parameters: the study's first trial, queued."""
    params = {field.name: field.default for lever in levers.SEARCH_ORDER for field in lever.fields
              if field.default is not None}
    params["steps"] = space.context.workload.reference_steps
    return params


def distilled_params(space: SearchSpace) -> list[dict[str, Any]]:
    """The distilled adapter as its maker runs it (everything else at the default), one trial per declared step
    count, fewest first: queued after the default so a short study weighs the adapter at least once. None where it
    is not offered."""
    if True not in space.values("distilled"):
        return []
    base = {key: value for key, value in default_params(space).items() if key not in ("steps", "cfg_batching")}
    return [{**base, "distilled": True, "distilled_steps": steps}
            for steps in sorted(space.context.workload.distilled.steps)]


def sample_profile(trial, space: SearchSpace) -> Profile:
    """A trial's profile: each searched lever draws its fields, in SEARCH_ORDER, from what it offered."""
    chosen: dict[str, Any] = {}
    for lever in levers.SEARCH_ORDER:
        chosen.update(lever.sample(trial, space.offers[lever.name], chosen, space.context))
    return Profile(**{**chosen, **space.placement}).validate()
