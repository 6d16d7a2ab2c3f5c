"""Fewer denoising steps than the workload's reference: not a change to the pipeline but an argument of each call
(`qwendoctor.runner.call_arguments`), declared here so the search, the lock and the quality floor treat it like the
other levers. Lossy.
"""

from __future__ import annotations

import math
from typing import Any

from probes.workload import MIN_STEPS
from qwendoctor.levers.base import Field, IntRange, Lever, Offer, SpaceContext

def _steps_offer(ctx: SpaceContext) -> Offer:
    """From the reference down to a fifth of it, in strides of a tenth: the floor, not the range, decides how
    few steps are enough (on the trained tiny model 4 of 50 already miss PSNR 30 dB, benchmarks/tiny). Only the
    reference on a model that does not draw."""
    reference = ctx.workload.reference_steps
    if not ctx.draws:
        return Offer({"steps": IntRange(reference, reference, 1)},
                     (f"fewer steps than {reference}: {ctx.workload.model} has random weights, so quality against "
                      "the reference says nothing about steps",))
    stride = max(1, reference // 10)
    low = reference - stride * ((reference - max(MIN_STEPS, math.ceil(reference / 5))) // stride)
    return Offer({"steps": IntRange(low, reference, stride)})


def _steps_sample(trial, offer: Offer, chosen: dict[str, Any], ctx: SpaceContext) -> dict[str, Any]:
    if chosen.get("distilled"):
        # A distilled adapter runs at the counts it was distilled for, not anywhere in the base's range.
        # Its own parameter name: Optuna keeps one distribution per name.
        return {"steps": trial.suggest_categorical("distilled_steps", ctx.workload.distilled.steps)}
    values = offer.values["steps"]
    steps = trial.suggest_int("steps", values.low, values.high, step=values.step)
    return {"steps": None if steps == ctx.workload.reference_steps else steps}


STEPS = Lever(
    name="steps", apply=None, undoable=True,
    fields=(Field("steps", int, None, low=MIN_STEPS, optional=True),),  # None: the workload's reference steps
    offer=_steps_offer, sample=_steps_sample, lossy=lambda p: p.steps is not None,
    describe=lambda p: f"steps={p.steps}" if p.steps is not None else None,
)
