"""A run's input images (`--image`, `--mask`): read and checked before any model loads, handed to the pipeline at
each render.

Each file is refused in one line, exit 2, before torch is imported: missing, not a regular file, larger than
MAX_IMAGE_BYTES, not an image, a side past probes.limits' input_side, and truncated or corrupt (decoded whole here:
PIL reads a truncated PNG's header and size without complaint and fails only when the pixels are read, which
would otherwise be minutes later, after the model loaded). A mask must be the image's size.

Without `--image`, the built-in models draw with a stand-in: a scene of the tiny model's shapes world at the size
asked (its mask the centre half), the same every run. tiny learned that world, and synthetic's random weights
draw noise from any input, so the stand-in times the pipeline as a photo of that size would.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

from probes import limits
from probes.workload import TASKS_WITH_STRENGTH, InputImage, Workload
from qwendoctor import files
from qwendoctor.errors import UsageError

# A 64 MP PNG (MAX_INPUT_SIDE squared) of a photo is about 100 MB; twice that is room without reading a disk image.
MAX_IMAGE_BYTES = 256 << 20
STAND_IN = "stand-in"  # path "<model>:stand-in": the drawn input of a built-in model
STAND_IN_MODELS = ("tiny", "synthetic")
# diffusers' default strength of QwenImageImg2ImgPipeline and QwenImageInpaintPipeline.
DEFAULT_STRENGTH = 0.6
TASK_WORDS = {"generate": "text-to-image", "edit": "an edit", "img2img": "image-to-image", "inpaint": "inpainting"}

# Decoded inputs by (sha256, is a mask): a study renders the same input hundreds of times.
_decoded: dict[tuple[str, bool], Any] = {}


def read_image(path: str, option: str = "--image", mask: bool = False) -> InputImage:
    """`path` checked whole and described (absolute path, sha256, size); a one-line UsageError naming `option`
    for anything that is not a readable image."""
    data = _read(path, option)
    image = _decode(data, path, option)
    digest = hashlib.sha256(data).hexdigest()
    _decoded[digest, mask] = image.convert("L" if mask else "RGB")
    return InputImage(path=os.path.abspath(path), sha256=digest, width=image.width, height=image.height)


def _read(path: str, option: str) -> bytes:
    if not path.strip():
        raise UsageError(f"{option} is empty; name an image file")
    try:
        return files.read_bounded(path, option, limit=MAX_IMAGE_BYTES, binary=True)
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{option} {path}: is a directory, not an image file") from None
    except OSError as error:
        raise UsageError(f"{option} {path}: cannot read it ({error.strerror or error})") from None


def _decode(data: bytes, path: str, option: str):
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # The size is checked below, before any pixel is decoded: PIL's own bomb warning would say it first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            for side in image.size:
                try:
                    limits.check("input_side", side, label=f"{option} {path}: each side")
                except limits.RangeError as error:
                    raise UsageError(f"{error} (the image is {image.width}x{image.height})") from None
            image.load()  # every pixel: a truncated file fails here, not after the model loaded
    except UnidentifiedImageError:
        raise UsageError(f"{option} {path}: not an image PIL can read (PNG, JPEG, WebP, ...)") from None
    except UsageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UsageError(f"{option} {path}: a damaged or truncated image ({first_words(error)})") from None
    return image


def first_words(error: BaseException) -> str:
    from probes.context import first_line

    return first_line(error, 120)


def stand_in(model: str, width: int, height: int, mask: bool = False) -> InputImage:
    """The built-in models' input when no `--image` is given: a shapes scene (or its mask) of this size."""
    image = _draw_stand_in(width, height, mask)
    digest = hashlib.sha256(f"{width}x{height}:{image.mode}:".encode() + image.tobytes()).hexdigest()
    _decoded[digest, mask] = image
    return InputImage(path=f"{model}:{STAND_IN}{'-mask' if mask else ''}", sha256=digest, width=width,
                      height=height)


def _draw_stand_in(width: int, height: int, mask: bool):
    import numpy as np
    from PIL import Image

    if mask:
        # The centre half repainted, the rest kept: what an inpainting call of a subject looks like.
        drawn = Image.new("L", (width, height), 0)
        drawn.paste(255, (width // 4, height // 4, width - width // 4, height - height // 4))
        return drawn
    from qwendoctor.tiny import shapes

    side = max(width, height)
    scene = shapes.render(shapes.parse(shapes.EXAMPLE_PROMPT), np.random.default_rng(0), side)
    return Image.fromarray(scene).resize((width, height), Image.BICUBIC)


def load(image: InputImage, mask: bool = False):
    """The decoded image (RGB; a mask in L) for a render. A file read again must be the file that was checked."""
    decoded = _decoded.get((image.sha256, mask))
    if decoded is not None:
        return decoded
    model, _, kind = image.path.partition(":")
    if kind.startswith(STAND_IN) and model in STAND_IN_MODELS:
        drawn = stand_in(model, image.width, image.height, mask=mask)
        if drawn.sha256 != image.sha256:
            raise UsageError(f"{image.path}: the stand-in drawn here is not the one this run was made with")
        return _decoded[drawn.sha256, mask]
    option = "--mask" if mask else "--image"
    again = read_image(image.path, option, mask=mask)
    if again.sha256 != image.sha256:
        raise UsageError(f"{option} {image.path}: the file changed while qwendoctor ran (sha256 "
                         f"{image.sha256[:12]}..., now {again.sha256[:12]}...)")
    return _decoded[again.sha256, mask]


def pipeline_arguments(workload: Workload, pipeline) -> dict[str, Any]:
    """The image arguments of a call of `pipeline` for `workload`'s task: the input image (a list for a pipeline
    that takes several), the mask, nothing for text-to-image."""
    if workload.task == "generate":
        return {}
    if not workload.inputs:
        raise UsageError(f"workload: task {workload.task} has no input image for this render")
    images = [load(image) for image in workload.inputs]
    arguments: dict[str, Any] = {"image": images if takes_image_list(pipeline) else images[0]}
    if workload.task == "inpaint":
        if workload.mask is None:
            raise UsageError("workload: inpainting has no mask for this render")
        arguments["mask_image"] = load(workload.mask, mask=True)
    return arguments


def takes_image_list(pipeline) -> bool:
    """Qwen-Image-Edit-2509's pipeline edits from several images; the others take one."""
    return type(pipeline).__name__ == "QwenImageEditPlusPipeline"


def task_workload(workload: Workload, task: str, images: tuple[str, ...], mask: str | None,
                  strength: float | None, max_images: int | None = None) -> Workload:
    """`workload` with the task the options ask for, its inputs read and checked (the built-in models' stand-ins
    where none is given): a one-line UsageError for any option that does not fit the task, before the model
    loads. `max_images`: what the model's edit pipeline takes (1 for Qwen-Image-Edit), where known."""
    import dataclasses

    check_options(task, images, mask, strength)
    if task == "generate":
        return dataclasses.replace(workload, task=task).validate()
    if max_images is not None and len(images) > max_images:
        raise UsageError(f"--image given {len(images)} times; this model's edit pipeline takes {max_images} "
                         f"input image{'s' if max_images > 1 else ''} (several need Qwen-Image-Edit-2509)")
    if images:
        inputs = tuple(read_image(path) for path in images)
    elif workload.model in STAND_IN_MODELS:
        inputs = (stand_in(workload.model, workload.width, workload.height),)
    else:
        raise UsageError(f"--task {task} needs --image PATH (the image to {'edit' if task == 'edit' else 'start from'})")
    read_mask = None
    if task == "inpaint":
        if mask is not None:
            read_mask = read_image(mask, "--mask", mask=True)
        elif workload.model in STAND_IN_MODELS and not images:
            read_mask = stand_in(workload.model, workload.width, workload.height, mask=True)
        else:
            raise UsageError("--task inpaint needs --mask PATH (white: repaint, black: keep), the image's size")
        check_mask_size(read_mask, inputs[0], mask or read_mask.path, images[0] if images else inputs[0].path)
    return dataclasses.replace(
        workload, task=task, inputs=inputs, input_sizes=tuple(image.size for image in inputs), mask=read_mask,
        strength=(DEFAULT_STRENGTH if strength is None else strength) if task in TASKS_WITH_STRENGTH else None,
    ).validate()


def check_options(task: str, images: tuple[str, ...], mask: str | None, strength: float | None) -> None:
    """The options that do not fit `task`, refused by name before anything is read."""
    if strength is not None:
        try:
            limits.check("strength", strength, label="--strength")
        except limits.RangeError as error:
            raise UsageError(str(error)) from None
        if task not in TASKS_WITH_STRENGTH:
            raise UsageError(f"--strength is for --task img2img or inpaint; this is {TASK_WORDS[task]} "
                             f"(--task {task})")
    if images and task == "generate":
        raise UsageError("--image is for --task edit, img2img or inpaint; this is text-to-image (--task generate)")
    if mask is not None and task != "inpaint":
        raise UsageError(f"--mask is for --task inpaint; this is {TASK_WORDS[task]} (--task {task})")
    if task in TASKS_WITH_STRENGTH and len(images) > 1:
        raise UsageError(f"--task {task} takes one --image, got {len(images)}")


def check_mask_size(mask: InputImage, image: InputImage, mask_name: str, image_name: str) -> None:
    if mask.size != image.size:
        raise UsageError(f"--mask {mask_name}: {mask.width}x{mask.height}, the image {image_name} is "
                         f"{image.width}x{image.height}; the mask must be the image's size")


def for_lock(locked: Workload, task: str | None, images: tuple[str, ...], mask: str | None,
             strength: float | None, where: str) -> Workload:
    """The lock's workload with this run's inputs: `--task` must be the lock's, each `--image` of the size the
    lock was tuned for (the sequence length, and so the tuned timing, follows it), in one line each before the
    model loads. Without --image, synthetic (random weights: noise from any input) draws its stand-in at the
    lock's input size; a model that draws is given the user's own input, never a stand-in in its place."""
    import dataclasses

    if task is not None and task != locked.task:
        raise UsageError(f"{where} was tuned for {TASK_WORDS[locked.task]} (task {locked.task}), not --task {task}; "
                         f"tune one with --task {task}")
    if locked.task == "generate":
        given = [option for option, present in (("--image", bool(images)), ("--mask", mask is not None),
                                                ("--strength", strength is not None)) if present]
        if given:
            raise UsageError(f"{given[0]}: {where} is a text-to-image lock (task generate), which takes no input "
                             "image; tune one with --task edit, img2img or inpaint")
        return locked
    check_options(locked.task, images, mask, strength)
    if images and len(images) != len(locked.input_sizes):
        raise UsageError(f"--image given {len(images)} time(s); {where} was tuned for {len(locked.input_sizes)} "
                         "input image(s)")
    if images:
        inputs = tuple(read_image(path) for path in images)
    elif locked.model == "synthetic":
        inputs = tuple(stand_in(locked.model, width, height) for width, height in locked.input_sizes)
    else:
        raise UsageError(f"{where} is for {TASK_WORDS[locked.task]} (task {locked.task}): give the input with "
                         "--image PATH")
    for given, image, size in zip(images or [i.path for i in inputs], inputs, locked.input_sizes):
        if image.size != size:
            raise UsageError(f"--image {given}: {image.width}x{image.height}, {where} was tuned for inputs of "
                             f"{size[0]}x{size[1]}; resize it, or tune for this size")
    read_mask = None
    if locked.task == "inpaint":
        if mask is not None:
            read_mask = read_image(mask, "--mask", mask=True)
        elif not images and locked.model == "synthetic":
            read_mask = stand_in(locked.model, inputs[0].width, inputs[0].height, mask=True)
        else:
            raise UsageError(f"{where} is for inpainting: give the mask with --mask PATH")
        check_mask_size(read_mask, inputs[0], mask or read_mask.path, images[0] if images else inputs[0].path)
    return dataclasses.replace(locked, inputs=inputs, mask=read_mask,
                               strength=locked.strength if strength is None else strength).validate()


def describe(workload: Workload) -> str:
    """The task and its inputs in a few words, for logs and PNG metadata."""
    if workload.task == "generate":
        return "text-to-image"
    sizes = ", ".join(f"{width}x{height}" for width, height in workload.input_sizes)
    strength = f", strength {workload.strength:g}" if workload.strength is not None else ""
    return f"{TASK_WORDS[workload.task]} of {sizes}{strength}"
