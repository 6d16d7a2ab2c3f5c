"""Build a tuned pipeline and render with it: the one code path tune, generate and bench share."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable

from probes import timing
from qwendoctor import inputs, levers, models
from qwendoctor.capabilities import Capabilities
from qwendoctor.levers import optimize
from qwendoctor.profile import Profile, Workload, check_runnable


def build(workload: Workload, profile: Profile, capabilities: Capabilities) -> models.LoadedModel:
    """Refuse what this machine cannot run, then load the model and apply the profile's levers."""
    check_runnable(profile, workload, capabilities)
    model = models.load_model(workload.model, capabilities.device, workload.dtype,
                              on_cpu=levers.load_on_cpu(profile), task=workload.task)
    optimize(model.pipe, profile, workload=workload)
    return model


def call_arguments(workload: Workload, profile: Profile) -> dict[str, Any]:
    """The numbers of a pipeline call; the input images are `inputs.pipeline_arguments`."""
    arguments = {
        "width": workload.width,
        "height": workload.height,
        "num_inference_steps": profile.steps or workload.reference_steps,
        # A distilled adapter runs with CFG off (levers.distilled): one pass a step.
        "true_cfg_scale": workload.true_cfg_scale if levers.runs_true_cfg(workload, profile) else 1.0,
    }
    if workload.strength is not None:
        arguments["strength"] = workload.strength
    return arguments


def with_denoised_steps(workload: Workload, profile: Profile, denoised: int) -> Profile:
    """`profile` with the step count a call needs to run `denoised` denoising steps: image-to-image at strength
    0.6 runs 3 of a 5-step schedule, so a 5-step timing asks for 9."""
    return dataclasses.replace(profile, steps=workload.schedule_for(denoised))


# Called after each denoising step of every render with (step, steps): progress bars (qwendoctor.report).
_step_listeners: list[Callable[[int, int], None]] = []


@contextlib.contextmanager
def on_each_step(listener: Callable[[int, int], None]):
    """Call `listener(step, steps)` after every denoising step rendered inside the block."""
    _step_listeners.append(listener)
    try:
        yield
    finally:
        _step_listeners.remove(listener)


def render(model: models.LoadedModel, workload: Workload, profile: Profile, prompt: str, seed: int,
           clock: timing.StepClock | None = None):
    """One image as a float32 array (H, W, 3) in [0, 1]."""
    import torch

    negative = workload.negative_prompt if levers.runs_true_cfg(workload, profile) else None
    # A CPU generator draws the same noise on every device, so references render alike on CPU and GPU.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    arguments = call_arguments(workload, profile)
    callback = clock
    if _step_listeners:
        steps = workload.denoised_steps(arguments["num_inference_steps"])

        def callback(pipe, step, timestep, callback_kwargs):
            result = clock(pipe, step, timestep, callback_kwargs) if clock is not None else {}
            for listener in list(_step_listeners):
                listener(step + 1, steps)
            return result
    with torch.inference_mode():
        output = model.pipe(
            **models.prompt_inputs(model, prompt, negative),
            **inputs.pipeline_arguments(workload, model.pipe),
            **arguments,
            generator=generator,
            output_type="np",
            callback_on_step_end=callback,
        )
    return output.images[0]


# Compilation and autotuning depend on shapes, not on the step count: two steps warm up as well as fifty.
WARMUP_STEPS = 2


def warm_up(model: models.LoadedModel, workload: Workload, profile: Profile, prompt: str, seed: int) -> float:
    """Render WARMUP_STEPS steps so compile, autotuning and lazy initialisation land here, not in the timed
    renders; the seconds it took."""
    timing.synchronize(model.device)
    started = time.perf_counter()
    steps = min(WARMUP_STEPS, workload.denoised_steps(profile.steps or workload.reference_steps))
    render(model, workload, with_denoised_steps(workload, profile, steps), prompt, seed)
    timing.synchronize(model.device)
    return time.perf_counter() - started


@dataclasses.dataclass
class Measurement:
    images: list[Any]
    latencies_s: list[float]
    step_s: list[float]
    warmup_s: float  # the first call: compile, autotuning and lazy initialisation land here, not in latencies
    peak_memory_gib: float | None
    # Steps each image reused from a cache (levers.cached_steps), None where the cache keeps no record.
    cached_steps: list[int | None] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, float]:
        result = {
            "latency_median_s": timing.median(self.latencies_s),
            "latency_p90_s": timing.percentile(self.latencies_s, 90),
            "step_ms": 1000 * timing.median(self.step_s),
            "warmup_s": self.warmup_s,
        }
        if self.peak_memory_gib is not None:
            result["peak_memory_gib"] = self.peak_memory_gib
        return result


def measure(model: models.LoadedModel, workload: Workload, profile: Profile, prompts: list[str],
            seeds: list[int], warmup: int = 1) -> Measurement:
    """Warm up, then render every (prompt, seed) once, timing each image and each step."""
    warmup_s = sum(warm_up(model, workload, profile, prompts[0], seeds[0]) for _ in range(warmup))
    levers.cached_steps(model.pipe)  # read once to start afresh: what the warm-up skipped is no image's

    timing.reset_peak_memory(model.device)
    images, latencies, steps, cached = [], [], [], []
    for prompt in prompts:
        for seed in seeds:
            clock = timing.StepClock(model.device)
            clock.start()
            images.append(render(model, workload, profile, prompt, seed, clock=clock))
            timing.synchronize(model.device)
            latencies.append(time.perf_counter() - clock.stamps[0])
            steps.extend(clock.step_seconds)
            cached.append(levers.cached_steps(model.pipe))
    return Measurement(images=images, latencies_s=latencies, step_s=steps, warmup_s=warmup_s,
                       peak_memory_gib=timing.peak_memory_gib(model.device), cached_steps=cached)


@dataclasses.dataclass
class StepTiming:
    step_s: list[float]
    warmup_s: float
    peak_memory_gib: float | None

    @property
    def step_median_s(self) -> float:
        return timing.median(self.step_s)


def time_steps(model: models.LoadedModel, workload: Workload, profile: Profile, prompt: str, seed: int,
               timed_steps: int) -> StepTiming:
    """The step time of `profile` from a short render: a warm-up (compile and autotuning land there),
    then `timed_steps` steps, each timed. A denoising step costs the same whatever the step count, so this
    predicts a full render's steps at a fraction of its cost; tune renders full images only for candidates."""
    warmup_s = warm_up(model, workload, profile, prompt, seed)
    timing.reset_peak_memory(model.device)
    clock = timing.StepClock(model.device)
    clock.start()
    render(model, workload, with_denoised_steps(workload, profile, timed_steps), prompt, seed, clock=clock)
    return StepTiming(step_s=clock.step_seconds, warmup_s=warmup_s,
                      peak_memory_gib=timing.peak_memory_gib(model.device))


class _FirstPass(Exception):
    """Raised from the transformer's first call to stop a render there: its shapes are all that was wanted."""


def transformer_sequence(model: models.LoadedModel, workload: Workload, prompt: str, seed: int) -> dict[str, int]:
    """The tokens of the transformer's first pass for `prompt`, read from the call the pipeline makes: image tokens
    (an edit's input latents included) and text tokens (an edit's prompt holds the vision tower's tokens of the
    input). The render runs up to that call (text encoder, the inputs' VAE encode) and is stopped there."""
    def stop(module, args, kwargs):
        raise _FirstPass(kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1])

    handle = model.pipe.transformer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        render(model, workload, with_denoised_steps(workload, Profile(), WARMUP_STEPS), prompt, seed)
    except _FirstPass as first:
        image, text = first.args
        return {"image_tokens": image, "text_tokens": text}
    finally:
        handle.remove()
    raise RuntimeError("the pipeline never called its transformer")


def release_memory() -> None:
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def classify_failure(error: BaseException) -> str:
    """A one-line reason recorded on a failed trial or bench row."""
    import torch

    from probes.context import first_line
    from qwendoctor import study
    from qwendoctor.errors import UnavailableLever

    line = first_line(error)
    if isinstance(error, torch.OutOfMemoryError):
        return f"{study.OUT_OF_MEMORY}: {line}"
    if isinstance(error, UnavailableLever):
        return f"unavailable: {line}"
    module = type(error).__module__ or ""
    if "_dynamo" in module or "_inductor" in module:
        return f"compile failed: {type(error).__name__}: {line}"
    return f"{type(error).__name__}: {line}"
