"""Procedural edits of the shapes world, and a checker that reads from the pixels whether an edit was made.

An edit model is judged on two things a text-to-image checker cannot see: the attribute the instruction names
changed as asked, and everything else stayed as it was in the input. Here an edit is a scene of `shapes` plus one
instruction in words ("make the circle green", "make the background yellow", "move the square to the bottom
right"); its target is the same scene with that one attribute changed, drawn with the same jitter, so the pair
differs only where the instruction says. `edit_check` reads the input and the output with `shapes.measure` and
compares: no second model, no human.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image

from qwendoctor.tiny import shapes

KINDS = ("colour", "background", "position")
# A recolour or a background change must leave the shape where it was: within the render's own position jitter
# (shapes.POSITION_JITTER per axis), as a fraction of the side. Tighter than "the same named position", which a
# shape could keep while sliding a quarter of the image.
KEPT_CENTROID_SHIFT = 0.06


@dataclasses.dataclass(frozen=True)
class Edit:
    source: shapes.Scene
    kind: str  # one of KINDS
    value: str  # the new colour, background colour or position name

    @property
    def instruction(self) -> str:
        if self.kind == "colour":
            return f"make the {self.source.shape} {self.value}"
        if self.kind == "background":
            return f"make the background {self.value}"
        where = "the center" if self.value == "center" else f"the {self.value}"
        return f"move the {self.source.shape} to {where}"

    @property
    def target(self) -> shapes.Scene:
        return dataclasses.replace(self.source, **{self.kind: self.value})


_INSTRUCTION = re.compile(r"^(?:make the (circle|square|triangle) (\w+)|make the background (\w+)|"
                          r"move the (circle|square|triangle) to the (top left|top right|bottom left|bottom right|"
                          r"center))$")


def parse_instruction(instruction: str) -> tuple[str, str, str | None]:
    """(kind, value, shape named or None) of an instruction of the grammar; ValueError for any other text."""
    match = _INSTRUCTION.match(instruction.strip())
    if not match:
        raise ValueError(f"not a shapes edit instruction: {instruction!r}")
    colour_shape, colour, background, move_shape, position = match.groups()
    if colour_shape:
        kind, value, shape = "colour", colour, colour_shape
    elif background:
        kind, value, shape = "background", background, None
    else:
        kind, value, shape = "position", position, move_shape
    if kind != "position" and value not in shapes.PALETTE:
        raise ValueError(f"not a shapes edit instruction: {instruction!r}")
    return kind, value, shape


def edits_of(scene: shapes.Scene) -> list[Edit]:
    """Every edit of `scene` whose target is a scene of the grammar (the shape never takes the background's
    colour), in a fixed order."""
    taken = (scene.colour, scene.background)
    return ([Edit(scene, "colour", colour) for colour in shapes.PALETTE if colour not in taken]
            + [Edit(scene, "background", colour) for colour in shapes.PALETTE if colour not in taken]
            + [Edit(scene, "position", position) for position in shapes.POSITIONS if position != scene.position])


def split(seed: int = 0) -> tuple[list[Edit], list[Edit]]:
    """(train, held_out) edits. Held out: every edit of a scene that `shapes.split(seed)` holds out, which the
    text-to-image model never drew either. Train: edits whose input and target are both training scenes, so no
    held-out scene is ever seen by the edit model, as input or as output."""
    train_scenes, held_scenes = shapes.split(seed)
    held = set(held_scenes)
    train = [edit for scene in train_scenes for edit in edits_of(scene) if edit.target not in held]
    held_out = [edit for scene in held_scenes for edit in edits_of(scene)]
    return train, held_out


def held_out_edits(split_seed: int = 0) -> list[Edit]:
    """The held-out edits in a fixed shuffled order (a benchmark takes them from the front)."""
    _, held_out = split(split_seed)
    order = np.random.default_rng(0).permutation(len(held_out))
    return [held_out[index] for index in order]


def render_pair(edit: Edit, seed, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) images of `edit`: the same jitter draws for both (where in its position, how big, which
    shade offsets), so they differ only in what the instruction changes."""
    source = shapes.render(edit.source, np.random.default_rng(seed), size)
    target = shapes.render(edit.target, np.random.default_rng(seed), size)
    return source, target


def read(image, shape: str) -> dict:
    """What `image` shows, in the grammar's words: background, colour, position (None where no shape is seen),
    size (read as a `shape`) and shape, plus the centroid."""
    seen = shapes.measure(image)
    side = image.size[1] if isinstance(image, Image.Image) else np.asarray(image).shape[0]
    reading = {"background": seen["background"], "colour": seen["colour"], "centroid": seen["centroid"],
               "position": None, "size": None, "shape": None}
    if seen["centroid"] is not None:
        reading["position"] = min(shapes.POSITIONS, key=lambda name: np.hypot(
            *np.subtract(shapes.POSITIONS[name], seen["centroid"])))
        half_extent = np.sqrt(seen["pixels"] / shapes._AREA_FACTOR[shape]) / side
        reading["size"] = "small" if half_extent < np.sqrt(shapes.SIZES["small"] * shapes.SIZES["large"]) else "large"
        reading["shape"] = ("square" if seen["box_fill"] > 0.88 else "circle" if seen["box_fill"] > 0.64
                            else "triangle")
    return reading


def edit_check(source_image, target, output_image, instruction: str) -> dict:
    """Whether `output_image` is `source_image` edited as `instruction` asks (`target`: the target scene or its
    prompt). Booleans:

    - `made`: the attribute the instruction names reads as asked (and as the target scene says);
    - `kept`: the other two of background, colour and position read as in the source image, and after a recolour
      the shape has not moved (centroid within `KEPT_CENTROID_SHIFT` of the source's);
    - `pass`: made and kept;
    - `copied`: the output reads exactly as the source (background, colour, position): the edit was not made;
    - `size_kept`, `shape_kept`: reported apart, as `shapes.check` reports size and shape apart (the weakest
      readings at 128 px through an 8x VAE).
    """
    target = shapes.parse(target) if isinstance(target, str) else target
    kind, value, named_shape = parse_instruction(instruction)
    shape = named_shape or target.shape
    source, output = read(source_image, shape), read(output_image, shape)
    asked = getattr(target, kind)
    made = output[kind] == value == asked
    kept_attributes = [name for name in KINDS if name != kind]
    kept = all(output[name] is not None and output[name] == source[name] for name in kept_attributes)
    if kept and kind != "position":
        kept = bool(np.hypot(*np.subtract(output["centroid"], source["centroid"])) <= KEPT_CENTROID_SHIFT)
    copied = all(output[name] == source[name] for name in KINDS)
    return {"made": bool(made), "kept": bool(kept), "pass": bool(made and kept), "copied": bool(copied),
            "size_kept": output["size"] == source["size"], "shape_kept": output["shape"] == source["shape"]}
