"""Run one probe and print its Finding as exactly one JSON line on stdout.

    python -m probes._worker <probe_id> [--module dotted.module]

The doctor runs native probes this way, in a subprocess, so a segfault, an abort or a hang kills this
process, not the report. `--module` runs a probe module that is not in the registry (tests use it).
Anything the probe or a library prints to stdout is sent to stderr, so stdout carries only the JSON line.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m probes._worker")
    parser.add_argument("probe_id")
    parser.add_argument("--module", default=None, help="probe module to run instead of the registry's")
    args = parser.parse_args(argv)
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
