"""Run probes in this process and print each Finding as one JSON line on stdout.

    python -m probes._worker <probe_id> [--module dotted.module]
    python -m probes._worker --group id=dotted.module,id=dotted.module [--wait]

The doctor runs native probes this way, in a subprocess, so a segfault, an abort or a hang kills this
process, not the report. `--module` runs a probe module that is not in the registry (tests use it).
`--group` runs several probes one after another in one process, which pays for importing torch and creating
a CUDA context once; a line is printed as each probe finishes, so when one kills the process the runner
knows which, keeps the findings before it and reruns the rest alone. `--wait` imports torch first, then waits
for a line on stdin: the timing probes' process starts while the other probes run and begins when told.
Anything the probe or a library prints to stdout is sent to stderr, so stdout carries only the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback


def run_one(probe_id: str, module: str | None = None) -> dict:
    from probes import PROBES, load_probe
    from probes.context import SETTINGS_ENV, ProbeContext, exc_line
    from qwendoctor.findings import Finding

    try:
        if module is None:
            module = {spec.id: spec.module for spec in PROBES}[probe_id]
        settings = json.loads(os.environ.get(SETTINGS_ENV) or "{}")
        finding = load_probe(module)(ProbeContext.from_settings(settings))
        if not isinstance(finding, Finding):
            raise TypeError(f"probe returned {type(finding).__name__}, not a Finding")
    except Exception as exc:
        tb = traceback.format_exception(exc)
        finding = Finding(id=probe_id, status="crash", summary=exc_line(exc),
                          details=[line.rstrip() for line in "".join(tb[-4:]).splitlines() if line.strip()],
                          fix=f"run `python -m probes._worker {probe_id}` to see the full output")
    finding.id = probe_id
    return finding.to_dict()


def _group(text: str) -> list[tuple[str, str]]:
    pairs = [item.partition("=") for item in text.split(",") if item]
    if not pairs or any(not sep or not probe_id or not module for probe_id, sep, module in pairs):
        raise argparse.ArgumentTypeError("expected id=module,id=module")
    return [(probe_id, module) for probe_id, _, module in pairs]


def run_group(group: list[tuple[str, str]], wait: bool) -> int:
    import time

    real_stdout = os.dup(1)
    os.dup2(2, 1)  # C-level and Python prints during the probes go to stderr
    if wait:
        try:
            import torch  # noqa: F401  (the import is what the wait overlaps)
        except Exception:  # a broken torch is each probe's finding to report, not this process's
            pass
        sys.stdin.readline()
    for probe_id, module in group:
        started = time.perf_counter()
        result = run_one(probe_id, module)
        result["elapsed_s"] = round(time.perf_counter() - started, 3)
        os.write(real_stdout, (json.dumps(result, default=str) + "\n").encode())
    os.close(real_stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m probes._worker")
    parser.add_argument("probe_id", nargs="?")
    parser.add_argument("--module", default=None, help="probe module to run instead of the registry's")
    parser.add_argument("--group", type=_group, help="id=module,... run in this order in this process")
    parser.add_argument("--wait", action="store_true", help="import torch, then wait for a line on stdin")
    args = parser.parse_args(argv)
    if args.group is not None:
        return run_group(args.group, args.wait)
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
