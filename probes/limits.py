"""The accepted range of every size, count and duration a user can give qwendoctor, and the one check of them.

Why one table: the same number arrives from a command-line option, from a lock file and from a `--profile` string,
and must get the same answer from each, before any model loads. An unbounded size or step count does not fail
fast: 16384x16384 hangs in native code for many minutes and ignores SIGTERM, a billion steps asks for gigabytes
of sigmas, `inf` as the CFG scale renders a black image and exits 0. The bounds are generous (what the real model
and a real machine can do, with room), never a judgement of what is sensible. It lives in probes/ because the
Workload it checks does (probes import nothing above them); the README's table of ranges is this table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

PIXELS_MULTIPLE = 16  # VAE downsamples by 8, then the transformer packs 2x2 patches


class RangeError(ValueError):
    """A number out of its documented range; the message names the field and the range. Exit 2 in the CLI."""


@dataclasses.dataclass(frozen=True)
class Range:
    low: float
    high: float
    integer: bool = True
    multiple: int = 1
    low_open: bool = False  # low itself is refused (a duration must be > 0)
    why: str = ""
    text: str = ""  # the rule in words, where the generic wording would read oddly

    def rule(self) -> str:
        number = _number
        if self.text:
            return self.text
        if self.multiple > 1:
            return f"a positive multiple of {self.multiple} up to {number(self.high)}"
        kind = "an integer" if self.integer else "a finite number"
        return f"{kind} {'>' if self.low_open else '>='} {number(self.low)} and <= {number(self.high)}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# Qwen-Image is trained up to ~1.8 MP (1328x1328, 1664x928); 4096 a side is 16x its tokens, already minutes a step
# on an H100, and beyond it attention's activations outgrow any one card.
MAX_SIDE = 4096
MAX_STEPS = 1000  # the schedulers' own training grid has 1000 timesteps
MAX_CPU_RANKS = 8  # gloo ranks on a machine without GPUs: each holds the whole pipeline in memory
# An input image (--image, --mask) is decoded whole before the pipeline resizes it (to ~1 MP for an edit, to the
# output size for image-to-image): 8192 a side is a 64 MP photo, 200 MB of RGB, past any camera's.
MAX_INPUT_SIDE = 8192

RANGES: dict[str, Range] = {
    "width": Range(PIXELS_MULTIPLE, MAX_SIDE, multiple=PIXELS_MULTIPLE),
    "height": Range(PIXELS_MULTIPLE, MAX_SIDE, multiple=PIXELS_MULTIPLE),
    # Qwen-Image's scheduler stretches sigmas to shift_terminal with (1 - sigma) / (1 - last sigma): 0/0 at one step.
    "steps": Range(2, MAX_STEPS, why=" (the scheduler yields NaN at 1)"),
    "true_cfg_scale": Range(1, 100, integer=False, text=">= 1 and <= 100, a finite number",
                            why=" (1 turns CFG off)"),
    "num_images": Range(1, 10_000),
    "num_prompts": Range(1, 1_000),
    "seeds": Range(1, 1_000),
    "trials": Range(1, 100_000),
    "timeout": Range(0, 30 * 86_400, integer=False, low_open=True, why=" seconds"),
    "heartbeat": Range(1, 86_400, why=" seconds"),
    "timed_steps": Range(2, MAX_STEPS),
    "gpus": Range(1, 1_024),
    "memory_limit": Range(0, 1_048_576, integer=False, low_open=True, why=" GiB"),
    "floor": Range(0, 1_000, integer=False, why=" dB"),  # the PSNR part of --floor (SSIM, LPIPS: their own)
    # A LoRA's weight (`--lora PATH:SCALE`): users run 0.5-1.5, negative scales invert a style; past 10 the
    # adapter's delta outweighs the base weights it was trained against, and inf or nan draws NaN.
    "lora_scale": Range(-10, 10, integer=False, text="a finite number >= -10 and <= 10"),
    # Image-to-image and inpainting: the share of the schedule run from the input (diffusers' `strength`); 0 runs
    # no step at all, and diffusers refuses above 1.
    "strength": Range(0, 1, integer=False, low_open=True, text="a finite number > 0 and <= 1"),
    "input_side": Range(1, MAX_INPUT_SIDE, why=" pixels"),
    "profile_int": Range(0, 1_000_000),
    "profile_float": Range(-1e6, 1e6, integer=False, text="a finite number"),
}


def check(field: str, value: Any, label: str | None = None, range_: Range | None = None) -> Any:
    """`value` if it is of `field`'s kind and in its range; else RangeError naming `label` (the option, or the
    lock's or profile's field) and the range."""
    limit = range_ or RANGES[field]
    label = label or field
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    elif limit.integer and not isinstance(value, int):
        ok = False
    elif not math.isfinite(value):
        ok = False
    else:
        ok = (value > limit.low if limit.low_open else value >= limit.low) and value <= limit.high \
            and (limit.multiple == 1 or value % limit.multiple == 0)
    if not ok and limit.multiple > 1:
        # Worded by what is wrong: a size off the grid, or one too large (the messages users have long seen).
        if ok_type(value) and value > limit.high:
            raise RangeError(f"{label} must be at most {_number(limit.high)} (a multiple of {limit.multiple}), "
                             f"got {value!r}")
        raise RangeError(f"{label} must be a positive multiple of {limit.multiple}, got {value!r} (at most "
                         f"{_number(limit.high)})")
    if not ok:
        raise RangeError(f"{label} must be {limit.rule()}{limit.why}, got {value!r}")
    return value


def ok_type(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def table() -> list[tuple[str, str]]:
    """(field, accepted range) for the README."""
    return [(name, limit.rule() + limit.why) for name, limit in RANGES.items()]
