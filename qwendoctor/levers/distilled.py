"""A few-step distilled LoRA as a lever (`distilled`): the workload's `--distilled` adapter, run the way its maker
declared (its step counts, true CFG off, its scheduler config) instead of the base model's reference steps and
true CFG. Lossy, and judged like every lossy lever: by the floor against the *base* model's reference images on
the same prompts and seeds, so the search weighs it against fewer base steps, caches and FP8 (and stacks it with
the lossless levers, FP8 and compile).

Qwen-Image-Lightning is the adapter users run this way: 8 or 4 steps, `true_cfg_scale=1.0` and a shift-3 scheduler
(`LIGHTNING_SCHEDULER`). Without those three a distilled adapter still runs and draws badly, silently, which is why
a LoRA whose declaration (adapter.json) says "distilled" is refused as an ordinary `--lora`.

Where each part lives: the adapter's weights are loaded by the lora lever (`apply_lora`, which adds it to the
workload's LoRAs when `distilled` is on, fused or unfused as `lora_mode` says); the step count is the steps lever's
field, drawn from the declared counts; CFG off is `runs_true_cfg` (runner, caches, CFG batching and CUDA graphs
read it); the scheduler is swapped here. The weights cannot be taken out of a transformer cheaply (undoable=False):
the pool gives a trial without the adapter a fresh one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from qwendoctor.errors import UsageError
from qwendoctor.levers.base import BenchRow, Field, Lever, Offer, SpaceContext

if TYPE_CHECKING:
    from qwendoctor.profile import Profile, Workload

# Qwen-Image-Lightning's scheduler, from its diffusers example (ModelTC/Qwen-Image-Lightning,
# generate_with_diffusers.py at commit 342260e, lines 82-97): shift 3 (log 3 on the exponential time shift) at
# every resolution, no terminal stretch. Used for a `--distilled` file that declares no scheduler of its own.
LIGHTNING_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def declared_steps(workload: "Workload") -> tuple[int, ...]:
    return workload.distilled.steps if workload.distilled is not None else ()


def apply_distilled(pipe, profile: "Profile"):
    """Install the adapter's scheduler (its weights came with the lora lever), or put the base's back."""
    base = vars(pipe).get("_qwendoctor_base_scheduler")
    if not profile.distilled:
        if base is not None:
            pipe.scheduler = base
            del vars(pipe)["_qwendoctor_base_scheduler"]
        return pipe
    workload = getattr(pipe, "_qwendoctor_workload", None)
    if workload is None or workload.distilled is None:
        raise UsageError("profile.distilled = true: the workload has no distilled adapter (pass --distilled)")
    if base is None:
        base = pipe.scheduler
        object.__setattr__(pipe, "_qwendoctor_base_scheduler", base)
    pipe.scheduler = type(base).from_config({**dict(base.config), **workload.distilled.scheduler_overrides})
    return pipe


def _distilled_runnable(profile: "Profile", workload: "Workload", capabilities) -> None:
    if not profile.distilled:
        return
    if workload.distilled is None:
        raise UsageError("profile.distilled = true: the workload has no distilled adapter; pass --distilled PATH")
    if profile.steps not in workload.distilled.steps:
        declared = ", ".join(str(s) for s in workload.distilled.steps)
        raise UsageError(f"profile.distilled = true runs the adapter at the step counts it was distilled for "
                         f"({declared}); got steps = {profile.steps}")


def _distilled_offer(ctx: SpaceContext) -> Offer:
    if ctx.workload.distilled is None:
        return Offer({"distilled": (False,)})
    if not ctx.draws:
        # On random weights every image is noise: the floor cannot tell a distilled adapter's drawing from the
        # base's, so it is timed (bench) rather than searched.
        return Offer({"distilled": (False,)}, (f"the distilled adapter: {ctx.workload.model} has random weights, "
                                               "so quality against the base's reference says nothing about it",))
    return Offer({"distilled": (False, True)})


def _distilled_sample(trial, offer: Offer, chosen: dict[str, Any], ctx: SpaceContext) -> dict[str, Any]:
    values = offer.values["distilled"]
    if len(values) < 2:
        return {}
    return {"distilled": trial.suggest_categorical("distilled", values)}


def _distilled_bench(capabilities, workload: "Workload") -> list[BenchRow]:
    return [BenchRow(f"distilled_{steps}", f"distilled adapter, {steps} steps, CFG off",
                     {"distilled": True, "steps": steps}) for steps in declared_steps(workload)]


DISTILLED = Lever(
    name="distilled", apply=apply_distilled, undoable=False,
    fields=(Field("distilled", bool, False, omit_default=True),),
    runnable=_distilled_runnable, offer=_distilled_offer, sample=_distilled_sample,
    lossy=lambda profile: profile.distilled,
    describe=lambda p: "distilled" if p.distilled else None,
    bench_alone=_distilled_bench,
)
