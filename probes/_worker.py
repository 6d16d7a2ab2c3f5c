"""Run probes in this process and print each Finding as one JSON line on stdout.

    python -m probes._worker <probe_id> [--module dotted.module]
    python -m probes._worker --group id=dotted.module,id=dotted.module [--gate shared|exclusive]

The doctor runs native probes this way, in a subprocess, so a segfault, an abort or a hang kills this
process, not the report. `--module` runs a probe module that is not in the registry (tests use it).
`--group` runs several probes one after another in one process, which pays for importing torch and creating
a CUDA context once; a line is printed as each probe finishes, so when one kills the process the runner
knows which, keeps the findings before it and reruns the rest alone. `--gate` makes the GPU a resource the
runner hands out: before a probe launches kernels (`ctx.use_gpu()`) the worker prints `#gpu` and waits for a
line on stdin; the probe's finding line hands the GPU back. `shared` probes use it together; an `exclusive`
(timing) worker imports torch and creates its CUDA context first, then asks before each of its probes, and
the runner lets it in only while no other probe holds the GPU.
Anything the probe or a library prints to stdout is sent to stderr, so stdout carries only the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import NoReturn

GATE_REQUEST = "#gpu"  # a worker's line asking the runner for the GPU (findings are JSON objects, never this)


def run_one(probe_id: str, module: str | None = None, gpu_gate=None) -> dict:
    from probes import PROBES, load_probe
    from probes.context import SETTINGS_ENV, ProbeContext, exc_line
    from probes.finding import Finding
    from probes.imports import crash_fix

    try:
        if module is None:
            module = {spec.id: spec.module for spec in PROBES}[probe_id]
        settings = json.loads(os.environ.get(SETTINGS_ENV) or "{}")
        ctx = ProbeContext.from_settings(settings)
        ctx.gpu_gate = gpu_gate
        finding = load_probe(module)(ctx)
        if not isinstance(finding, Finding):
            raise TypeError(f"probe returned {type(finding).__name__}, not a Finding")
    except Exception as exc:
        tb = traceback.format_exception(exc)
        finding = Finding(id=probe_id, status="crash", summary=exc_line(exc),
                          details=[line.rstrip() for line in "".join(tb[-4:]).splitlines() if line.strip()],
                          fix=crash_fix(probe_id, exc))
    finding.id = probe_id
    return finding.to_dict()


def _group(text: str) -> list[tuple[str, str]]:
    pairs = [item.partition("=") for item in text.split(",") if item]
    if not pairs or any(not sep or not probe_id or not module for probe_id, sep, module in pairs):
        raise argparse.ArgumentTypeError("expected id=module,id=module")
    return [(probe_id, module) for probe_id, _, module in pairs]


def _warm_cuda() -> None:
    """Import torch, create the CUDA context and the cuBLAS handle: driver and library set-up, no kernels, so
    it overlaps the other probes' GPU work while the timing probes' clock starts without it."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.empty(1, device="cuda")  # an allocation: creates the context, launches nothing
            torch.cuda.current_blas_handle()
    except Exception:  # a broken torch or driver is each probe's finding to report, not this process's
        pass


def run_group(group: list[tuple[str, str]], gate: str | None) -> NoReturn:
    import time

    real_stdout = os.dup(1)
    os.dup2(2, 1)  # C-level and Python prints during the probes go to stderr
    held, waited = False, 0.0

    def acquire() -> None:
        nonlocal held, waited
        if gate is None or held:
            return
        asked = time.perf_counter()
        os.write(real_stdout, (GATE_REQUEST + "\n").encode())
        sys.stdin.readline()  # "go" (or end of file: the runner is gone, and so is our stdout)
        waited += time.perf_counter() - asked
        held = True

    from probes.context import mark

    mark("worker_up", probes=[probe_id for probe_id, _ in group])
    if gate == "exclusive":
        _warm_cuda()
        mark("cuda_ready")
    for probe_id, module in group:
        if gate == "exclusive":
            acquire()
        mark("probe_start", probe=probe_id)
        started, waited = time.perf_counter(), 0.0
        result = run_one(probe_id, module, gpu_gate=acquire)
        result["elapsed_s"] = round(time.perf_counter() - started - waited, 3)  # the probe's work, not its wait
        os.write(real_stdout, (json.dumps(result, default=str) + "\n").encode())
        held = False  # the runner takes the GPU back when it reads the finding
    os.close(real_stdout)
    # Everything is reported: skip the interpreter's teardown (torch, a CUDA context: seconds) that the
    # runner would otherwise wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m probes._worker")
    parser.add_argument("probe_id", nargs="?")
    parser.add_argument("--module", default=None, help="probe module to run instead of the registry's")
    parser.add_argument("--group", type=_group, help="id=module,... run in this order in this process")
    parser.add_argument("--gate", choices=("shared", "exclusive"), default=None,
                        help="ask the runner for the GPU on stdout and wait for its answer on stdin")
    args = parser.parse_args(argv)
    if args.group is not None:
        return run_group(args.group, args.gate)
    if args.probe_id is None:
        parser.error("a probe id or --group is required")
    if args.module is None:
        from probes import probe_ids

        if args.probe_id not in probe_ids():
            parser.error(f"unknown probe {args.probe_id!r}; known: {', '.join(probe_ids())}")  # exits 2

    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)  # C-level and Python prints during the probe go to stderr
    try:
        result = run_one(args.probe_id, args.module)
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    sys.stdout.write(json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
