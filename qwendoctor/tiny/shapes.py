"""A procedural, captioned image set the trained tiny model learns to draw, and a checker that reads the pixels.

Quality metrics against a reference render only say whether a speed-up changed the picture; whether the model draws
what the prompt asks needs a judge. Scenes here are one flat-coloured shape on a flat background, captioned from a
small grammar ("a small red circle at the top left on a blue background"), so `check` can decide from the pixels
alone whether an image shows its prompt: no second model, no human.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from collections import deque
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

# Colours far apart in RGB (the closest pair, blue and purple, is 116 apart) so a blurry decode still classifies.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 210),
    "yellow": (235, 210, 50),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "purple": (150, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
# Half the shape's extent as a fraction of the image side: 2.25x apart, so even jittered and blurred the two
# sizes stay a third away from the threshold between them.
SIZES = {"small": 0.08, "large": 0.18}
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
# Each render varies within its prompt (where exactly, how big, which shade): a prompt has many right answers, so
# the flow from noise bends and a render with too few steps drifts from the 50-step one, as with a real model.
POSITION_JITTER = 0.05  # of the image side, each axis
SIZE_JITTER = 0.12  # relative
SHADE_JITTER = 12  # per channel, of 255
# Area of each shape in units of its half-extent squared: turns a measured area back into a size.
_AREA_FACTOR = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
HELD_OUT_FRACTION = 0.1
# The style the style LoRA learns: a border painted round the picture, in a colour neither the shape nor the
# background has. A flat band of one latent token (16 px at 128 px) is something this 8x VAE reproduces; a
# 3 px outline round the shape, tried first, it blurs away (its round trip kept the outline on 64% of renders).
STYLES = (None, "frame")
FRAME_WIDTH = 1 / 8  # of the image side
FRAME_COLOURS = ("white", "black", "red")
# Where the checker reads a framed picture: inside the frame, past the blur of its inner edge.
FRAME_INSET = FRAME_WIDTH + 1 / 16
EXAMPLE_PROMPT = "a large red circle at the top left on a blue background"


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    @property
    def prompt(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where} on a {self.background} background"


_PROMPT = re.compile(r"^a (\w+) (\w+) (\w+) (?:in the center|at the (top left|top right|bottom left|bottom right)) "
                     r"on a (\w+) background$")


def parse(prompt: str) -> Scene:
    """The scene a prompt of the grammar describes; ValueError for any other text."""
    match = _PROMPT.match(prompt.strip())
    if not match:
        raise ValueError(f"not a shapes prompt: {prompt!r}")
    size, colour, shape, position, background = match.groups()
    scene = Scene(shape, colour, size, position or "center", background)
    if shape not in SHAPES or colour not in PALETTE or size not in SIZES or background not in PALETTE:
        raise ValueError(f"not a shapes prompt: {prompt!r}")
    return scene


def all_scenes() -> list[Scene]:
    """Every scene of the grammar (the shape never takes the background's colour), in a fixed order."""
    return [Scene(shape, colour, size, position, background)
            for shape, colour, size, position, background
            in itertools.product(SHAPES, PALETTE, SIZES, POSITIONS, PALETTE) if colour != background]


def split(seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """(train, held_out): a prompt is held out by a hash of itself and the seed, so the split of a prompt never
    depends on which other prompts exist."""
    train, held_out = [], []
    for scene in all_scenes():
        digest = hashlib.sha256(f"{seed}:{scene.prompt}".encode()).digest()
        (held_out if int.from_bytes(digest[:8], "little") / 2**64 < HELD_OUT_FRACTION else train).append(scene)
    return train, held_out


def frame_colour(scene: Scene) -> str:
    """The frame style's colour: white, or black where the scene already uses white, or red for the scenes made of
    white and black. Always a third colour, so the frame shows on every scene."""
    return next(name for name in FRAME_COLOURS if name not in (scene.colour, scene.background))


def render(scene: Scene, rng: np.random.Generator, size: int = 128, style: str | None = None) -> np.ndarray:
    """The scene as an HxWx3 uint8 array, its position, size and shades jittered by `rng`. `style="frame"` then
    draws a `FRAME_WIDTH` border in `frame_colour` over it; it draws nothing more from `rng`, so a framed render
    is the plain one with its border painted."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {STYLES}")
    supersample = 4  # drawn large, then box-filtered: soft edges the VAE can reproduce
    side = size * supersample
    cx, cy = (np.array(POSITIONS[scene.position]) + rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2)) * side
    half = SIZES[scene.size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) * side
    background, fill = (tuple(int(c) for c in np.clip(np.add(PALETTE[name], rng.integers(
        -SHADE_JITTER, SHADE_JITTER + 1, 3)), 0, 255)) for name in (scene.background, scene.colour))
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    if scene.shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:  # pointing up, base and height 2*half, its centroid at (cx, cy)
        draw.polygon([(cx, cy - 4 * half / 3), (cx - half, cy + 2 * half / 3), (cx + half, cy + 2 * half / 3)],
                     fill=fill)
    if style == "frame":
        width = round(FRAME_WIDTH * side)
        draw.rectangle([0, 0, side - 1, side - 1], outline=PALETTE[frame_colour(scene)], width=width)
    return np.asarray(image.resize((size, size), Image.BOX))


def images(scenes: list[Scene], variants: int, seed: int, size: int = 128) -> Iterator[tuple[Scene, np.ndarray]]:
    """`variants` jittered renders of each scene, the same for the same arguments."""
    for index, scene in enumerate(scenes):
        for variant in range(variants):
            yield scene, render(scene, np.random.default_rng([seed, index, variant]), size)


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    distances = np.linalg.norm(np.array([PALETTE[name] for name in names], float) - rgb, axis=-1)
    return names[int(np.argmin(distances))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask`: stray specks elsewhere must not move the centroid."""
    labels = np.zeros(mask.shape, np.int32)
    best_label, best_count, next_label = 0, 0, 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        next_label += 1
        labels[start] = next_label
        queue, count = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            count += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = next_label
                    queue.append((ny, nx))
        if count > best_count:
            best_label, best_count = next_label, count
    return labels == best_label if best_count else mask


def _erode(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _pixels(image) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)[..., :3]
    # the pipeline's output_type="np" gives floats in [0, 1]
    return pixels * 255.0 if np.issubdtype(pixels.dtype, np.floating) else pixels.astype(float)


def _ring(pixels: np.ndarray, inset: int, width: int = 3) -> np.ndarray:
    """The pixels of a `width`-wide square ring `inset` pixels in from the image's edge, as (N, 3)."""
    inner = pixels[inset:pixels.shape[0] - inset, inset:pixels.shape[1] - inset]
    return np.concatenate([inner[:width].reshape(-1, 3), inner[-width:].reshape(-1, 3),
                           inner[:, :width].reshape(-1, 3), inner[:, -width:].reshape(-1, 3)])


def measure(image, inset: float = 0.0) -> dict:
    """What the pixels show: background and shape colour names, and the shape's centroid (fractions of the side),
    area in pixels and the share of its bounding box it fills. `inset` (a fraction of the side) reads only the
    picture that far in from the edge, as inside a frame."""
    pixels = _pixels(image)
    side = pixels.shape[0]
    margin = round(inset * side)
    # The border ring is background: only the apex of a large triangle in a top corner can reach it.
    background_rgb = np.median(_ring(pixels, margin), axis=0)
    # Under half the closest palette distance (116) and over twice the shade jitter: a pixel this far from the
    # background belongs to something else.
    foreground = np.linalg.norm(pixels - background_rgb, axis=-1) > 55
    if margin:
        inside = np.zeros_like(foreground)
        inside[margin:side - margin, margin:side - margin] = True
        foreground &= inside
    shape_mask = _largest_component(foreground)
    area = int(shape_mask.sum())
    result = {"background": _nearest_colour(background_rgb), "pixels": area}
    if area < 0.25 * _AREA_FACTOR["triangle"] * (SIZES["small"] * side) ** 2:  # a speck is not a shape
        return result | {"colour": None, "centroid": None, "box_fill": None}
    core = _erode(_erode(shape_mask))
    colour_rgb = np.median(pixels[core if core.sum() >= 4 else shape_mask], axis=0)
    ys, xs = np.nonzero(shape_mask)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    return result | {"colour": _nearest_colour(colour_rgb), "centroid": ((xs.mean() + 0.5) / side,
                     (ys.mean() + 0.5) / side), "box_fill": area / box}


def check(image, prompt: str, style: str | None = None) -> dict:
    """Whether `image` (PIL or HxWx3 array) shows `prompt`: one boolean per attribute, `pass` for the colours and
    the position (background, shape colour, where), and `all` for every attribute. Size and shape (circle, square or
    triangle, from how much of its bounding box the shape fills) are reported apart: at 128 px through an 8x VAE
    the corners of a small shape blur, so they are the weakest reading of the image, not of the prompt.
    With `style="frame"` the picture is read inside the frame (`FRAME_INSET` in from the edge): the same verdicts
    for what the prompt asks, the frame itself judged by `style_present`."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {STYLES}")
    scene = parse(prompt)
    seen = measure(image, FRAME_INSET if style == "frame" else 0.0)
    side = image.size[1] if isinstance(image, Image.Image) else np.asarray(image).shape[0]
    verdict = {"background": seen["background"] == scene.background, "colour": seen["colour"] == scene.colour}
    if seen["centroid"] is None:
        verdict |= {"position": False, "size": False, "shape": False}
    else:
        nearest = min(POSITIONS, key=lambda name: np.hypot(*np.subtract(POSITIONS[name], seen["centroid"])))
        half_extent = np.sqrt(seen["pixels"] / _AREA_FACTOR[scene.shape]) / side
        size = "small" if half_extent < np.sqrt(SIZES["small"] * SIZES["large"]) else "large"
        # A circle fills pi/4 of its box, a square all of it, the triangle half.
        shape = "square" if seen["box_fill"] > 0.88 else "circle" if seen["box_fill"] > 0.64 else "triangle"
        verdict |= {"position": nearest == scene.position, "size": size == scene.size,
                    "shape": shape == scene.shape}
    verdict["pass"] = all(verdict[key] for key in ("background", "colour", "position"))
    verdict["all"] = verdict["pass"] and verdict["size"] and verdict["shape"]
    return verdict


def frame_contrast(image) -> float:
    """RGB distance between the image's outer band (where a frame is) and the band just inside it (where the
    background is): ~0 on a plain picture, the distance between two palette colours on a framed one."""
    pixels = _pixels(image)
    side = pixels.shape[0]
    outer = np.median(_ring(pixels, round(side / 64), round(side / 16)), axis=0)
    inner = np.median(_ring(pixels, round(FRAME_INSET * side), round(side / 32)), axis=0)
    return float(np.linalg.norm(outer - inner))


def style_present(image) -> bool:
    """Whether `image` shows the frame style: a border of another colour than the background inside it. Reads the
    pixels alone, no prompt. The threshold is the checker's own foreground distance (half the closest palette
    distance)."""
    return frame_contrast(image) > 55


def held_out_prompts(split_seed: int = 0) -> list[str]:
    """The prompts the model never trained on, in a fixed shuffled order: tune takes its prompts from the front and
    checks its lock on prompts from the back, so the two never overlap."""
    _, held_out = split(split_seed)
    order = np.random.default_rng(0).permutation(len(held_out))
    return [held_out[index].prompt for index in order]
