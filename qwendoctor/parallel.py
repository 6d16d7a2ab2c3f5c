"""Multi-GPU generation: one process per GPU started by torchrun, and the process group they join.

The strategies that split the work (cfg, ulysses, ring, cfg+ulysses, cfg+ring) are levers, applied by the lever
table in their place: their mechanism lives in qwendoctor.levers.parallel. This module starts the ranks, joins them
into a process group, picks the strategy for `--gpus N`, and reports a failing rank's error. Every rank runs the
whole pipeline (scheduler, VAE) on identical inputs and gets identical latents back from the collectives; rank 0
alone writes images and prints.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from qwendoctor import files
from qwendoctor.errors import QwendoctorError, UsageError
from qwendoctor.levers import parallel as parallel_levers
from qwendoctor.profile import Profile

# torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in every rank; qwendoctor's launcher also sets ERROR_DIR_ENV, so
# that a failing rank can name its error, and so that a process knows it is one of our ranks: RANK=1 left in a
# cluster node's environment must not make `generate` believe it is a non-writing rank and write nothing.
ERROR_DIR_ENV = "QWENDOCTOR_RANK_ERRORS"
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SCRATCH_PREFIX = "qwendoctor-ranks-"  # + the launcher's pid: a folder of a launcher killed outright is found again
TIMEOUT_ENV = "QWENDOCTOR_DIST_TIMEOUT_S"
# A collective that waits longer than this fails instead of hanging. Generous: a rank may be compiling (FP8
# compiles take ~165 s on an H100) while the others already wait in the first collective.
DEFAULT_TIMEOUT_S = 900.0


def in_rank() -> bool:
    """True inside a rank qwendoctor's launcher started (torchrun's variables and our own marker); stray RANK,
    WORLD_SIZE or LOCAL_RANK variables alone (a cluster node's, a user's shell) are ignored."""
    return ERROR_DIR_ENV in os.environ and all(name in os.environ for name in RANK_ENV)


def rank() -> int:
    if not in_rank():
        return 0
    value = os.environ["RANK"]
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"RANK={value!r}: not a rank number (the environment of a launched rank)") from None


def is_main() -> bool:
    return rank() == 0


def default_strategy(gpus: int, does_cfg: bool) -> str:
    """What `--gpus N` runs when the lock names no strategy: CFG across two groups when the workload has true
    CFG (one exchange per step instead of one per attention call), Ulysses for the rest of the split."""
    if gpus == 1:
        return "none"
    if does_cfg and gpus == 2:
        return "cfg"
    if does_cfg and gpus % 2 == 0:
        return "cfg+ulysses"
    return "ulysses"


def with_gpus(profile: Profile, gpus: int, strategy: str | None, does_cfg: bool) -> Profile:
    """`profile` run on `gpus` GPUs: the given strategy, else the profile's own if it fits, else the default.
    CFG batching gives way to the cfg strategies (both handle the same two passes) and to ring (its mask)."""
    import dataclasses

    if strategy is None:
        strategy = profile.parallel if profile.parallel != "none" and gpus > 1 else default_strategy(gpus, does_cfg)
    changed = dataclasses.replace(profile, parallel=strategy, gpus=gpus)
    if changed.cfg_degree == 2 or strategy == "ring":
        changed = dataclasses.replace(changed, cfg_batching=False)
    return changed.validate()


def dist_timeout_s() -> float:
    """$QWENDOCTOR_DIST_TIMEOUT_S, checked where it is read: a bad value named as the variable, not a ValueError
    inside every rank."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 < value <= 86_400:
        raise UsageError(f"{TIMEOUT_ENV}={text!r}: must be a number of seconds > 0 and <= 86400")
    return value


def check_gpu_count(gpus: int, device: str, visible: int, option: str = "--gpus") -> None:
    """`option`: what set the count (`--gpus`, or a lock's profile.gpus), named in the error."""
    from probes.limits import MAX_CPU_RANKS

    if gpus < 1:
        raise UsageError(f"{option} must be at least 1, got {gpus}")
    if device != "cuda" and gpus > MAX_CPU_RANKS:
        # Each CPU rank holds the whole pipeline: a million of them filled 23 GB and left orphans behind.
        raise UsageError(f"{option} {gpus}: no GPU here; at most {MAX_CPU_RANKS} CPU ranks (gloo)")
    if device == "cuda" and gpus > visible:
        raise UsageError(f"{option} {gpus}: only {visible} GPU{'s' if visible != 1 else ''} visible here "
                         "(CUDA_VISIBLE_DEVICES, nvidia-smi)")


def init_process_group(device: str) -> None:
    """Join the ranks torchrun started: NCCL for the GPUs, plus gloo for small CPU tensors (diffusers'
    Ulysses-anything exchanges the per-rank sequence lengths on the CPU, which saves a device sync per
    attention call); gloo alone on the CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=dist_timeout_s())
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # No device_id: with a bound default group DeviceMesh makes its groups by ncclCommSplit instead of
        # new_group, which keeps the "cpu:gloo,cuda:nccl" pair that the size exchange's gloo half needs.
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def destroy_process_group() -> None:
    import torch.distributed as dist

    parallel_levers.forget_meshes()
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- the launcher ---------------------------------------------------------------------------------------------


def report_failure(message: str, exit_code: int) -> None:
    """Called by a failing rank: leave its one-line error where the launcher looks for it."""
    directory = os.environ.get(ERROR_DIR_ENV)
    if not directory or not in_rank():
        return
    record = {"rank": rank(), "message": message, "exit_code": exit_code, "time": time.time()}
    path = os.path.join(directory, f"rank-{rank()}.json")
    try:
        files.write_text_atomic(path, json.dumps(record))
    except OSError:
        pass  # the launcher falls back to torchrun's own report


def launch(gpus: int, module_argv: list[str], echo=None) -> int:
    """Run `python -m <module_argv>` as `gpus` ranks under torchrun on this host; return 0 or raise.

    torchrun stops every rank as soon as one exits non-zero (max-restarts 0), so a failing rank ends the run
    within about a second instead of leaving the others waiting in a collective. The ranks' stderr is kept
    back; lines that start with "qwendoctor:" (rank 0's notes) are passed on through `echo`, and on failure
    the first failing rank's error line is raised.

    Nothing outlives it: torchrun's logs and the ranks' error records go to one temporary folder removed on the
    way out; torchrun dies with this process (PR_SET_PDEATHSIG, even if this one is killed outright), each rank
    with torchrun (die_with_launcher), and on Ctrl-C or SIGTERM torchrun is told to stop its ranks and waited
    for."""
    from probes.limits import MAX_CPU_RANKS, RANGES

    if not 1 <= gpus <= max(RANGES["gpus"].high, MAX_CPU_RANKS):  # callers check against the machine first
        raise UsageError(f"--gpus {gpus}: out of range")
    dist_timeout_s()  # a bad variable named here, not in every rank
    remove_stale_scratch()
    scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
    errors = os.path.join(scratch, "errors")
    os.mkdir(errors)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(gpus), "--max-restarts", "0", "--monitor-interval", "0.1",
            "--log-dir", os.path.join(scratch, "logs"), "-m", *module_argv]
    env = {**os.environ, ERROR_DIR_ENV: errors}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // gpus)))
    try:
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=_parent_death_signal(signal.SIGTERM))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    kept: list[str] = []

    def read_stderr():
        for line in proc.stderr:
            kept.append(line)
            if echo and line.startswith("qwendoctor:") and not line.startswith("qwendoctor: error:"):
                echo(line.rstrip("\n"))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached torchrun too (same process group); SIGTERM, which reached only us, did not. Either
            # way torchrun stops its ranks on SIGTERM.
            _stop(proc)
            raise
        reader.join(timeout=5)
        if code == 0:
            return 0
        if os.environ.get("QWENDOCTOR_DEBUG") == "1":
            sys.stderr.write("".join(kept))
        first = _first_failure(errors)
        if first is not None:
            raise QwendoctorError(f"rank {first['rank']}: {first['message']}", exit_code=first["exit_code"])
        raise QwendoctorError(f"torchrun exited with code {code}: {_torchrun_reason(kept)}")
    finally:
        _stop(proc)
        shutil.rmtree(scratch, ignore_errors=True)


def remove_stale_scratch() -> list[str]:
    """The temporary folders of launchers that were killed outright (no cleanup could run): those whose process
    is gone. Returns their paths."""
    import glob

    import psutil

    removed = []
    for path in glob.glob(os.path.join(glob.escape(tempfile.gettempdir()), f"{SCRATCH_PREFIX}*-*")):
        pid = os.path.basename(path)[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """torchrun, if still running: SIGTERM (it stops its ranks), then SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _parent_death_signal(sig: int):
    """A function that asks the kernel to send `sig` to the calling process when its parent dies, however it dies
    (Linux's PR_SET_PDEATHSIG; elsewhere a no-op). Resolved here, in the parent: between fork and exec a child may
    call it, but must not import anything (another thread may have held the import lock at the fork)."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None
    pr_set_pdeathsig = 1

    def request() -> None:
        if prctl is not None:
            prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)

    return request


def die_with_launcher() -> None:
    """In a rank: exit when torchrun exits. torchrun starts each rank in a session of its own, so a torchrun killed
    outright (the OOM killer, kill -9) would leave its ranks waiting in a collective for up to the timeout."""
    if not in_rank():
        return
    _parent_death_signal(signal.SIGKILL)()
    if os.getppid() == 1:  # torchrun was gone before the request took effect
        os._exit(1)


def _first_failure(directory: str) -> dict | None:
    records = []
    for name in os.listdir(directory):
        if name.endswith(".json"):
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as handle:
                    records.append(json.load(handle))
            except (OSError, ValueError):
                continue
    return min(records, key=lambda r: r["time"]) if records else None


def _torchrun_reason(lines: list[str]) -> str:
    """A rank that died without reporting (a signal, an abort in native code): torchrun's summary names it."""
    for line in lines:
        if "exitcode" in line and "local_rank" in line:
            return line.strip().split("] ", 1)[-1][:300]
    meaningful = [line.strip() for line in lines if line.strip()]
    return meaningful[-1][:300] if meaningful else "no output"


# At import: every rank imports this module within its first seconds (qwendoctor generate, qwendoctor.strategies,
# the tests' ranks), long before it can block in a collective.
die_with_launcher()
