"""`qwendoctor.apply(pipe, profile)`: a profile applied to a diffusers pipeline the user built themselves.

`load_pipeline(lock)` loads the model the lock names and applies its profile; a user who builds the pipeline
(their own checkpoint, device placement or components) needs the second half alone. The checks are the ones
`generate` makes before anything runs, through the same functions: the profile's own (`Profile.validate`), the
lock's fingerprint (`generate.check_fingerprint`), the placement against the memory limit and the limit itself
(`levers.memory`), and what this machine can run (`profile.check_runnable`). Then the lever table applies it
(`levers.optimize`). What `generate` checks after loading (the model revision) has no counterpart here: the
pipeline is the user's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from qwendoctor.errors import UsageError
from qwendoctor.profile import Profile, Workload


def apply(pipe, profile: Profile | str | os.PathLike, *, workload: Workload | None = None,
          ignore_fingerprint: bool = False):
    """Apply `profile` to `pipe` (a diffusers QwenImagePipeline) in place and return it.

    `profile` is a Profile, a `name=value,...` string (`Profile.from_text`, as `--profile` takes it) or the path
    of a lock (a Path, a string ending in `.lock`, or any existing file). A lock brings its workload and is
    refused when it was tuned on another setup unless `ignore_fingerprint` is set. `workload` says how the
    pipeline will be called, for the checks and the levers that must know in advance (a cache's CFG passes and
    fixed schedule); without one, Workload's defaults are checked (true CFG 4.0 and 50 steps, as a
    QwenImagePipeline call's defaults) in the pipeline's dtype. Steps, size and CFG remain arguments of each
    call (`qwendoctor.runner.call_arguments(workload, profile)` gives them).

    Bad input raises `qwendoctor.errors.UsageError` with a one-line message; a lever this machine cannot run
    raises `UnavailableLever`, before the pipeline is touched.
    """
    from probes.workload import WorkloadError
    from qwendoctor.capabilities import detect_capabilities
    from qwendoctor.levers import memory, optimize
    from qwendoctor.profile import check_runnable

    chosen, lock_workload = _resolve(profile, ignore_fingerprint)
    if lock_workload is not None:
        if workload is not None:
            raise UsageError("workload: a lock brings the workload it was tuned for; pass one or the other")
        workload = lock_workload
    if workload is not None and not isinstance(workload, Workload):
        raise UsageError(f"workload: expected a qwendoctor.profile.Workload, got {type(workload).__name__}")
    checked = workload if workload is not None else _call_defaults(pipe)
    try:
        checked.validate()
    except WorkloadError as error:
        raise UsageError(str(error)) from None
    memory.check_placement(chosen, checked)
    memory.apply(checked.memory_limit_gib)
    check_runnable(chosen, checked, detect_capabilities())
    # The defaults are a guess at the user's calls: only a workload they named is handed to the levers.
    return optimize(pipe, chosen, workload=workload)


def _resolve(profile: Any, ignore_fingerprint: bool) -> tuple[Profile, Workload | None]:
    """The Profile `profile` names, and the workload of the lock it came from (None for a profile)."""
    from qwendoctor import lockfile
    from qwendoctor.generate import check_fingerprint

    if isinstance(profile, Profile):
        return profile.validate(), None
    if isinstance(profile, os.PathLike) or (isinstance(profile, str) and _names_a_file(profile)):
        path = os.fspath(profile)
        lock = lockfile.read_lock(path)
        if not ignore_fingerprint:
            check_fingerprint(lock, path)
        from qwendoctor.levers import lora

        lora.check_files(lock.workload, path)
        return lock.profile, lock.workload
    if isinstance(profile, str):
        return Profile.from_text(profile), None
    raise UsageError(f"profile: expected a Profile, a name=value,... string or a lock path, got "
                     f"{type(profile).__name__}")


def _names_a_file(text: str) -> bool:
    # A profile's text holds `=`; a lock is named by its suffix, or found on disk.
    return text.endswith(".lock") or os.path.isfile(text)


def _call_defaults(pipe) -> Workload:
    """Workload's defaults in the pipeline's dtype: true CFG 4.0 and 50 steps, what a QwenImagePipeline call
    does unless told otherwise."""
    component = getattr(pipe, "transformer", None)
    dtype = getattr(component if component is not None else pipe, "dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else Workload.dtype
    return dataclasses.replace(Workload(), model=type(pipe).__name__, dtype=name)
