"""The reference a study compares against: the default profile's images, rendered once per workload and cached
on disk (checksummed, tied to the model's revision, one writer at a time), and the default's latency, which is
never cached: it is timed in every run, beside the trials it is compared with.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import zipfile
from typing import TYPE_CHECKING, Any, Callable

from probes.context import first_line
from qwendoctor import files, models, runner
from qwendoctor.pool import ModelPool

if TYPE_CHECKING:
    from qwendoctor.tune import TuneOptions

# Images of the default timed in every run, beside its trials: the median of three is not skewed by one slow
# moment (one busy reference image once set a study's baseline at 29 s where the default took 1.3 s).
BASELINE_IMAGES = 3


@contextlib.contextmanager
def _exclusive(path: str, log: Callable[[str], None], waiting: str):
    """An flock on `path`: workers on one host take turns. (Across hosts each has its own cache.)"""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def reference(options: TuneOptions, pool: ModelPool, name: str, log: Callable[[str], None]):
    """The default profile's images, timing and model revision, rendered once per study and kept on disk with
    what they belong to and a checksum: a cache file that is damaged, of another workload or of another revision
    of a built-in model is rendered again, with a one-line note.

    Workers starting together on one host render it once: the others wait on the lock, then read the cache."""
    import numpy as np

    path = os.path.join(files.cache_dir(options.cache_dir), f"reference-{name}.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    belongs_to = json.dumps({"study": name, "workload": options.workload.identity(), "prompts": options.prompts,
                             "seeds": options.seeds}, sort_keys=True)
    with _exclusive(path + ".lock", log, "reference renders: waiting for another worker rendering them"):
        if os.path.exists(path):
            try:
                expected = models.builtin_revision(options.workload.model, options.workload.task)
                images, summary, revision = _read_reference(path, belongs_to, expected)
                log(f"reference renders: {path} (cached)")
                return images, summary, revision
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
                log(f"reference renders: {path} not usable ({first_line(error)}); rendering them again")
        log(f"reference renders: {len(options.prompts) * len(options.seeds)} images with the default profile")
        model = pool.prepare(options.baseline).model
        measurement = runner.measure(model, options.workload, options.baseline, options.prompts, options.seeds)
        summary, revision = measurement.summary(), model.revision
        with files.atomic_write(path, "wb") as handle:
            np.savez_compressed(handle, count=len(measurement.images), summary=json.dumps(summary),
                                revision=revision or "", belongs_to=belongs_to,
                                checksum=_reference_checksum(measurement.images, summary, revision or ""),
                                **{f"image{i}": image for i, image in enumerate(measurement.images)})
        return measurement.images, summary, revision


def time_baseline(options: TuneOptions, pool: ModelPool, log: Callable[[str], None]) -> dict[str, float]:
    """The default's seconds per image and per step, timed in this run: BASELINE_IMAGES images after a warm-up,
    their median. Never read from the reference cache: a latency is a fact of the moment it was timed, and a
    figure cached by an earlier study (a busy minute included) would set every later study's estimates and
    headline. The reference's images are cached; its timing is not used."""
    model = pool.prepare(options.baseline).model
    summary = runner.measure(model, options.workload, options.baseline, options.prompts[:1],
                             [options.seeds[0]] * BASELINE_IMAGES).summary()
    log(f"baseline: the default timed in this run: {summary['latency_median_s']:.3g} s per image (median of "
        f"{BASELINE_IMAGES}), {summary['step_ms']:.4g} ms per step")
    return summary


def _reference_checksum(images, summary: dict[str, Any], revision: str) -> str:
    import numpy as np

    digest = hashlib.sha256(json.dumps(summary, sort_keys=True).encode() + revision.encode())
    for image in images:
        digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def _read_reference(path: str, belongs_to: str, expected_revision: str | None):
    """The cached references, or ValueError saying why they cannot be trusted."""
    import numpy as np

    with np.load(path) as stored:
        if "belongs_to" not in stored or str(stored["belongs_to"]) != belongs_to:
            raise ValueError("made for another workload, prompt set or study")
        revision = str(stored["revision"])
        if expected_revision is not None and revision != expected_revision:
            raise ValueError(f"made with model revision {revision or 'unknown'}, this one is {expected_revision}")
        images = [stored[f"image{i}"] for i in range(int(stored["count"]))]
        summary = json.loads(str(stored["summary"]))
        if str(stored["checksum"]) != _reference_checksum(images, summary, revision):
            raise ValueError("checksum mismatch")
    return images, summary, revision or None
