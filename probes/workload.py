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
# What is generated: text-to-image (QwenImagePipeline), an edit of input images (QwenImageEditPipeline, or
# QwenImageEditPlusPipeline for Qwen-Image-Edit-2509), image-to-image (QwenImageImg2ImgPipeline) and inpainting
# (QwenImageInpaintPipeline): diffusers' own pipelines, the same transformer.
TASKS = ("generate", "edit", "img2img", "inpaint")
TASKS_WITH_STRENGTH = ("img2img", "inpaint")
# Qwen-Image-Edit-2509 takes a list of images, each about 1 MP of latents more in the sequence: 8 of them are
# 32768 image tokens, what one 4096x2048 output holds, already past what tune can compare in minutes.
MAX_EDIT_IMAGES = 8
# diffusers' edit pipelines resize an input to about this many pixels at its own aspect ratio, on a grid of 32.
EDIT_INPUT_AREA = 1024 * 1024
# Qwen2-VL's image processor refuses an aspect ratio above 200 (its smart_resize), and the edit pipelines give
# every input to it.
MAX_EDIT_ASPECT = 200


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
class InputImage:
    """One input image of a run (`--image`, `--mask`): not lock content (a lock holds for any input of its size),
    but what the reference renders and a study are tied to, by the file's sha256. Reading and checking the file
    is qwendoctor.inputs'; this is only what the run carries."""

    path: str  # an absolute path, or "<model>:stand-in" for the built-in models' drawn input
    sha256: str
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, label: str) -> "InputImage":
        if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(cls)}:
            raise WorkloadError(f"{label}: expected path, sha256, width and height, got {data!r}")
        return cls(**data)


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
    task: str = "generate"
    # Each input image's (width, height): a lock is valid for inputs of these sizes (the sequence length, and so
    # the step time, follows them).
    input_sizes: tuple[tuple[int, int], ...] = ()
    strength: float | None = None  # img2img and inpaint: the share of the schedule run from the input
    # The run's input files, and the inpainting mask: per run, never written to a lock (to_dict leaves them out).
    inputs: tuple[InputImage, ...] = ()
    mask: InputImage | None = None

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
        self._validate_task()
        return self

    def _validate_task(self) -> None:
        if self.task not in TASKS:
            raise WorkloadError(f"workload.task: {self.task!r} is not one of {', '.join(TASKS)}")
        if not isinstance(self.input_sizes, tuple) or not all(
                isinstance(size, tuple) and len(size) == 2 for size in self.input_sizes):
            raise WorkloadError("workload.input_sizes: must be [width, height] pairs")
        for index, size in enumerate(self.input_sizes):
            try:
                for side in size:
                    limits.check("input_side", side, label=f"workload.input_sizes[{index}]:")
            except RangeError as error:
                raise WorkloadError(str(error)) from None
        if self.task == "generate":
            if self.input_sizes or self.inputs or self.mask is not None:
                raise WorkloadError("workload: input images given to a text-to-image workload (task generate)")
        elif self.task == "edit":
            if not 1 <= len(self.input_sizes) <= MAX_EDIT_IMAGES:
                raise WorkloadError(f"workload.input_sizes: an edit takes 1 to {MAX_EDIT_IMAGES} input images, got "
                                    f"{len(self.input_sizes)}")
            for width, height in self.input_sizes:
                if max(width, height) / min(width, height) > MAX_EDIT_ASPECT:
                    raise WorkloadError(f"workload.input_sizes: an edit input of {width}x{height} is over "
                                        f"{MAX_EDIT_ASPECT}:1, which Qwen2-VL's image processor refuses")
        elif len(self.input_sizes) != 1:
            raise WorkloadError(f"workload.input_sizes: task {self.task} takes one input image, got "
                                f"{len(self.input_sizes)}")
        if self.task in TASKS_WITH_STRENGTH:
            if self.strength is None:
                raise WorkloadError(f"workload.strength: task {self.task} needs a strength")
            try:
                limits.check("strength", self.strength, label="workload.strength:")
            except RangeError as error:
                raise WorkloadError(str(error)) from None
        elif self.strength is not None:
            raise WorkloadError(f"workload.strength: only img2img and inpaint take a strength, the task is "
                                f"{self.task}")
        if self.inputs:
            if not all(isinstance(image, InputImage) for image in self.inputs):
                raise WorkloadError("workload.inputs: must be input images")
            sizes = tuple(image.size for image in self.inputs)
            if sizes != self.input_sizes:
                raise WorkloadError(f"workload.inputs: {_sizes(sizes)} for inputs of {_sizes(self.input_sizes)}")
        if self.mask is not None and self.task != "inpaint":
            raise WorkloadError(f"workload.mask: only inpaint takes a mask, the task is {self.task}")
        if self.mask is not None and self.inputs and self.mask.size != self.inputs[0].size:
            raise WorkloadError(f"workload.mask: {_sizes([self.mask.size])} for an image of "
                                f"{_sizes([self.inputs[0].size])}")

    @property
    def does_cfg(self) -> bool:
        return self.true_cfg_scale > 1

    @property
    def image_tokens(self) -> int:
        # VAE downsamples 8x, the transformer patchifies 2x2: 1328x1328 -> 83x83 = 6889 tokens.
        return (self.height // PIXELS_MULTIPLE) * (self.width // PIXELS_MULTIPLE)

    @property
    def input_image_tokens(self) -> int:
        """Image tokens the inputs add to every transformer pass: an edit appends each input's latents, resized to
        about 1 MP, to the sequence (1024x1024 output: 4096 tokens more); image-to-image and inpainting start
        from the input's latents instead, adding none."""
        if self.task != "edit":
            return 0
        total = 0
        for width, height in self.input_sizes:
            edit_width, edit_height = edit_input_size(width, height)
            total += (edit_width // PIXELS_MULTIPLE) * (edit_height // PIXELS_MULTIPLE)
        return total

    def denoised_steps(self, steps: int) -> int:
        """The denoising steps a call with `steps` runs: image-to-image and inpainting skip the schedule's first
        (1 - strength), as diffusers' get_timesteps counts them."""
        if self.strength is None or self.task not in TASKS_WITH_STRENGTH:
            return steps
        return steps - int(max(steps - min(steps * self.strength, steps), 0))

    def schedule_for(self, denoised: int) -> int:
        """The step count a call needs for at least `denoised` denoising steps to run (at most the steps' range)."""
        steps = denoised
        while self.denoised_steps(steps) < denoised and steps < limits.MAX_STEPS:
            steps += 1
        return steps

    def to_dict(self) -> dict[str, Any]:
        """What a lock records: the inputs' sizes, never the files themselves."""
        data = dataclasses.asdict(self)
        data["loras"] = [lora.to_dict() for lora in self.loras]
        if data["memory_limit_gib"] is None:  # TOML has no null; and locks without a limit stay as they were
            del data["memory_limit_gib"]
        if self.distilled is None:
            del data["distilled"]
        else:
            data["distilled"] = self.distilled.to_dict()
        # Left out at their defaults, so text-to-image locks are as they were before editing existed.
        if self.task == "generate":
            del data["task"]
        data["input_sizes"] = [list(size) for size in self.input_sizes]
        if not self.input_sizes:
            del data["input_sizes"]
        if self.strength is None:
            del data["strength"]
        del data["inputs"], data["mask"]
        return data

    def identity(self) -> dict[str, Any]:
        """to_dict and, where there are inputs, the files' sha256: what reference renders and a study are made
        for (other input files of the same sizes are another study, and draw other references)."""
        data = self.to_dict()
        if self.inputs:
            data["inputs"] = [image.to_dict() for image in self.inputs]
        if self.mask is not None:
            data["mask"] = self.mask.to_dict()
        return data

    @classmethod
    def from_identity(cls, data: dict[str, Any]) -> "Workload":
        """The Workload `identity()` described, its inputs included (a multi-GPU rank's job)."""
        fields = dict(data)
        inputs = tuple(InputImage.from_dict(entry, f"workload.inputs[{index}]")
                       for index, entry in enumerate(fields.pop("inputs", [])))
        mask = fields.pop("mask", None)
        return dataclasses.replace(cls.from_dict(fields), inputs=inputs,
                                   mask=None if mask is None else InputImage.from_dict(mask, "workload.mask")
                                   ).validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Workload":
        if not isinstance(data, dict):
            raise WorkloadError("workload: expected a table")
        names = {f.name for f in dataclasses.fields(cls)} - {"inputs", "mask"}  # per run, never in a lock
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
        if "input_sizes" in fields:
            sizes = fields["input_sizes"]
            if not isinstance(sizes, list) or not all(isinstance(size, list) and len(size) == 2 for size in sizes):
                raise WorkloadError(f"workload.input_sizes: must be a list of [width, height], got {sizes!r}")
            fields["input_sizes"] = tuple(tuple(size) for size in sizes)
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


def edit_input_size(width: int, height: int) -> tuple[int, int]:
    """The size diffusers' edit pipelines resize an input to (their calculate_dimensions): about EDIT_INPUT_AREA
    pixels at the input's aspect ratio, each side on a grid of 32."""
    ratio = width / height
    edit_width = (EDIT_INPUT_AREA * ratio) ** 0.5
    return round(edit_width / 32) * 32, round(edit_width / ratio / 32) * 32


def _sizes(sizes) -> str:
    return ", ".join(f"{width}x{height}" for width, height in sizes) or "none"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
