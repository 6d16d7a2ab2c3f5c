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
import os
import subprocess
import sys
import tempfile
import threading
import time

from qwendoctor import files
from qwendoctor.errors import QwendoctorError, UsageError
from qwendoctor.levers import parallel as parallel_levers
from qwendoctor.profile import Profile

# torchrun sets these in every rank; qwendoctor sets ERROR_DIR_ENV so a failing rank can name its error.
ERROR_DIR_ENV = "QWENDOCTOR_RANK_ERRORS"
TIMEOUT_ENV = "QWENDOCTOR_DIST_TIMEOUT_S"
# A collective that waits longer than this fails instead of hanging. Generous: a rank may be compiling (FP8
# compiles take ~165 s on an H100) while the others already wait in the first collective.
DEFAULT_TIMEOUT_S = 900.0


def in_rank() -> bool:
    """True inside a process torchrun started (it sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


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


def check_gpu_count(gpus: int, device: str, visible: int) -> None:
    if gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {gpus}")
    if device == "cuda" and gpus > visible:
        raise UsageError(f"--gpus {gpus}: only {visible} GPU{'s' if visible != 1 else ''} visible here "
                         "(CUDA_VISIBLE_DEVICES, nvidia-smi)")


def init_process_group(device: str) -> None:
    """Join the ranks torchrun started: NCCL for the GPUs, plus gloo for small CPU tensors (diffusers'
    Ulysses-anything exchanges the per-rank sequence lengths on the CPU, which saves a device sync per
    attention call); gloo alone on the CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
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
    the first failing rank's error line is raised."""
    errors = tempfile.mkdtemp(prefix="qwendoctor-ranks-")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(gpus), "--max-restarts", "0", "--monitor-interval", "0.1",
            "-m", *module_argv]
    env = {**os.environ, ERROR_DIR_ENV: errors}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // gpus)))
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    kept: list[str] = []

    def read_stderr():
        for line in proc.stderr:
            kept.append(line)
            if echo and line.startswith("qwendoctor:") and not line.startswith("qwendoctor: error:"):
                echo(line.rstrip("\n"))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # torchrun passes the interrupt on to the ranks and stops them
        raise
    reader.join(timeout=5)
    try:
        if code == 0:
            return 0
        if os.environ.get("QWENDOCTOR_DEBUG") == "1":
            sys.stderr.write("".join(kept))
        first = _first_failure(errors)
        if first is not None:
            raise QwendoctorError(f"rank {first['rank']}: {first['message']}", exit_code=first["exit_code"])
        raise QwendoctorError(f"torchrun exited with code {code}: {_torchrun_reason(kept)}")
    finally:
        for name in os.listdir(errors):
            os.unlink(os.path.join(errors, name))
        os.rmdir(errors)


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
