"""Generate with a tuned lock: `qwendoctor generate` and `qwendoctor.load_pipeline`."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import re
import time
from typing import Any, Iterator

from probes import timing
from qwendoctor import __version__, fingerprint, lockfile, models, runner
from qwendoctor.capabilities import detect_capabilities
from qwendoctor.errors import QwendoctorError, UsageError
from qwendoctor.profile import Profile, Workload


@dataclasses.dataclass
class TunedPipeline:
    """The diffusers pipeline with the lock's profile applied, plus the workload it was tuned for."""

    model: models.LoadedModel
    workload: Workload
    profile: Profile
    lock: lockfile.Lock

    @property
    def pipeline(self):
        return self.model.pipe

    def __call__(self, prompt: str, seed: int = 0, image: str | os.PathLike | list | None = None,
                 mask: str | os.PathLike | None = None):
        """One image (PIL) at the tuned size, steps and CFG. For a lock of an edit, image-to-image or inpainting:
        `image` (a path, or a list of them for an edit model that takes several) and `mask`, checked as
        `generate --image` and `--mask` are: of the sizes the lock was tuned for."""
        from PIL import Image

        from qwendoctor import inputs

        workload = self.workload
        if image is not None or mask is not None:
            paths = [image] if isinstance(image, (str, os.PathLike)) else list(image or [])
            workload = inputs.for_lock(self.lock.workload, None, tuple(os.fspath(path) for path in paths),
                                       None if mask is None else os.fspath(mask), None, "the pipeline's lock")
            workload = dataclasses.replace(workload, loras=self.workload.loras)
        array = runner.render(self.model, workload, self.profile, prompt, seed)
        return Image.fromarray((array * 255).round().clip(0, 255).astype("uint8"))

    def swap_loras(self, *specs: str) -> None:
        """Put other LoRAs (`PATH[:SCALE]`, as `--lora` takes them) in place of the loaded ones, adapter for
        adapter, without a new compiled graph: a lock with lora_mode=unfused, LoRAs of its rank or lower."""
        from qwendoctor.levers import lora

        given = tuple(lora.parse_spec(spec, self.workload.model, "swap_loras") for spec in specs)
        lora.hotswap(self.pipeline, given, self.workload.model)
        self.workload = dataclasses.replace(self.workload, loras=given)


def check_fingerprint(lock: lockfile.Lock, lock_path: str) -> None:
    """Refuse a lock tuned on another setup, before anything loads."""
    revision_source = lock.fingerprint.get("model_revision")
    here = fingerprint.machine_fingerprint(lock.workload.model, revision_source)
    # model_revision of a pretrained model is only known once loaded; load_tuned compares it after loading.
    differing = [d for d in fingerprint.differences(lock.fingerprint, here, lock.profile)
                 if not d.startswith("model_revision")]
    if differing:
        raise QwendoctorError(f"{lock_path} was tuned on another setup ({'; '.join(differing)}); "
                              "re-run `qwendoctor tune`, or pass --ignore-fingerprint")


def load_tuned(lock_path: str, ignore_fingerprint: bool = False, profile: Profile | None = None) -> TunedPipeline:
    """The pipeline of the lock at `lock_path` (`build_tuned`)."""
    return build_tuned(lockfile.read_lock(lock_path), lock_path, ignore_fingerprint, profile)


_FROM_LOCK = object()


def build_tuned(lock: lockfile.Lock, lock_path: str, ignore_fingerprint: bool = False,
                profile: Profile | None = None, memory_limit_gib: Any = _FROM_LOCK) -> TunedPipeline:
    """The lock's pipeline, with `profile` instead of the lock's where given (the lock's on more GPUs), under the
    lock's GPU memory limit unless `memory_limit_gib` says otherwise. The fingerprint is checked before anything
    loads, the model revision once the model is built."""
    from qwendoctor.levers import lora, memory

    profile = profile or lock.profile
    if not ignore_fingerprint:
        check_fingerprint(lock, lock_path)
    lora.check_files(lock.workload, lock_path)  # a LoRA changed since the tune: another workload
    limit = lock.workload.memory_limit_gib if memory_limit_gib is _FROM_LOCK else memory_limit_gib
    memory.check_placement(profile, dataclasses.replace(lock.workload, memory_limit_gib=limit))
    memory.apply(limit)
    model = runner.build(lock.workload, profile, detect_capabilities())
    if not ignore_fingerprint and lock.fingerprint.get("model_revision") != model.revision:
        raise QwendoctorError(f"{lock_path} was tuned on model revision {lock.fingerprint.get('model_revision')}, "
                              f"here it is {model.revision}; re-run `qwendoctor tune`, or pass --ignore-fingerprint")
    return TunedPipeline(model=model, workload=lock.workload, profile=profile, lock=lock)


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "image"


def claim_path(directory: str, stem: str) -> tuple[str, Any]:
    """Create a new PNG file exclusively: an existing image is never overwritten, even by a concurrent run."""
    os.makedirs(directory, exist_ok=True)
    for attempt in range(10_000):
        name = f"{stem}.png" if attempt == 0 else f"{stem}-{attempt}.png"
        path = os.path.join(directory, name)
        try:
            return path, open(path, "xb")
        except FileExistsError:
            continue
    raise QwendoctorError(f"{directory}: too many images named {stem}*.png")


def png_metadata(tuned: TunedPipeline, prompt: str, seed: int) -> dict[str, str]:
    return {
        "prompt": prompt,
        "seed": str(seed),
        "model": tuned.workload.model,
        "steps": str(tuned.profile.steps or tuned.workload.reference_steps),
        "true_cfg_scale": str(tuned.workload.true_cfg_scale),
        "profile": json.dumps(tuned.profile.to_dict(), sort_keys=True),
        "software": f"qwendoctor {__version__}",
        **_task_metadata(tuned.workload),
    }


def _task_metadata(workload: Workload) -> dict[str, str]:
    """What an edit, image-to-image or inpainting PNG was made from: the inputs by name and sha256."""
    if workload.task == "generate":
        return {}
    data = {"task": workload.task,
            "inputs": json.dumps([{"path": image.path, "sha256": image.sha256} for image in workload.inputs])}
    if workload.mask is not None:
        data["mask"] = json.dumps({"path": workload.mask.path, "sha256": workload.mask.sha256})
    if workload.strength is not None:
        data["strength"] = f"{workload.strength:g}"
    return data


def warm_up(tuned: TunedPipeline) -> float:
    """Pay the one-time costs before the first image, whatever the profile: compile and autotuning (50 s of a
    compiled profile's 50.4 s first image on an H100), and for every profile the first call's lazy
    initialisation of the text encoder, transformer and VAE (on the CPU with tiny an eager lock's first image took
    2.62 s against its 1.39 s warm median). The seconds it took, which generate reports apart from the images."""
    return runner.warm_up(tuned.model, tuned.workload, tuned.profile, "warm-up", 0)


def first_image_extra_s(seconds: list[float]) -> float | None:
    """What the first image cost over the median of the others: one-time costs a warm-up did not catch (None
    with a single image: nothing to compare it with)."""
    if len(seconds) < 2:
        return None
    return seconds[0] - timing.median(seconds[1:])


def generate_images(tuned: TunedPipeline, prompt: str, seed: int, num_images: int,
                    out_dir: str, save: bool = True) -> Iterator[tuple[str | None, float]]:
    """Render `num_images` (seeds seed, seed+1, ...) and yield (path, seconds) for each as it is written.
    With `save` off (the other ranks of a multi-GPU run) the images are rendered, not written: path None."""
    from PIL import PngImagePlugin

    if num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {num_images}")
    for index in range(num_images):
        image_seed = seed + index
        timing.synchronize(tuned.model.device)
        started = time.perf_counter()
        image = tuned(prompt, seed=image_seed)
        timing.synchronize(tuned.model.device)
        seconds = time.perf_counter() - started
        if not save:
            yield None, seconds
            continue
        info = PngImagePlugin.PngInfo()
        for key, value in png_metadata(tuned, prompt, image_seed).items():
            info.add_itxt(key, value)
        encoded = io.BytesIO()
        image.save(encoded, format="PNG", pnginfo=info)
        path = write_new_png(out_dir, f"{_slug(prompt)}-{image_seed}", encoded.getvalue(), index)
        yield path, seconds


def write_new_png(out_dir: str, stem: str, data: bytes, written_before: int) -> str:
    """Write `data` under a new name (`stem.png`, `stem-1.png`, ...), whole or not at all: written to a hidden
    temporary file first, then hard-linked to the first free name (a link never replaces a file, so a concurrent
    run is never overwritten). A full disk, a quota or a kill while writing leaves no truncated PNG to pass for an
    image; a temporary file left by `kill -9` is removed by the next run that writes here."""
    from qwendoctor import files

    try:
        with files.atomic_write(os.path.join(out_dir, f"{stem}.png"), "wb", durable=True, publish=False) as handle:
            handle.write(data)
        temporary = handle.name
        try:
            return _link_to_new_name(temporary, out_dir, stem)
        except OSError as error:
            if error.errno not in NO_HARD_LINKS:
                raise
            return _write_claimed(out_dir, stem, data)  # a file system without hard links (FAT, some FUSE)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
    except OSError as error:
        raise QwendoctorError(f"writing {os.path.join(out_dir, stem + '.png')}: {error.strerror or error}; nothing "
                              f"kept of it ({written_before} image(s) written before it)") from None


NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK)


def _link_to_new_name(temporary: str, out_dir: str, stem: str) -> str:
    for attempt in range(10_000):
        path = os.path.join(out_dir, f"{stem}.png" if attempt == 0 else f"{stem}-{attempt}.png")
        try:
            os.link(temporary, path)
            return path
        except FileExistsError:
            continue
    raise QwendoctorError(f"{out_dir}: too many images named {stem}*.png")


def _write_claimed(out_dir: str, stem: str, data: bytes) -> str:
    path, handle = claim_path(out_dir, stem)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return path
