"""`qwendoctor check`: run the probes, render the report, decide the exit code.

Exit code: 0 when no finding is fail or crash, 1 otherwise (warn and skip do not fail the run),
2 for usage errors (an unknown probe id).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import click

import probes
from probes import PROBES, ProbeSpec
from probes.context import SETTINGS_ENV, ProbeContext, Workload, exc_line
from qwendoctor.errors import EXIT_FAILURE, EXIT_OK, UsageError
from qwendoctor.findings import FAILING_STATUSES, Finding

SCHEMA_VERSION = 1
# The directory holding the `probes` package: put on the worker's PYTHONPATH so it imports from any cwd.
_PROBES_ROOT = str(Path(probes.__file__).resolve().parent.parent)

WorkerArgv = Callable[[ProbeSpec], list[str]]


def default_worker_argv(spec: ProbeSpec) -> list[str]:
    # -P: do not put the cwd on sys.path, so a stray `probes/` in the user's cwd cannot shadow ours.
    return [sys.executable, "-P", "-m", "probes._worker", spec.id, "--module", spec.module]


def _crash(spec: ProbeSpec, reason: str, details: list[str] | None = None) -> Finding:
    return Finding(id=spec.id, status="crash", summary=reason, details=details or [],
                   fix=f"run `python -m probes._worker {spec.id}` to see the full output")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output on stderr)"


def _tail(text: str, n: int = 8) -> list[str]:
    return [line.rstrip() for line in (text or "").splitlines() if line.strip()][-n:]


def _run_in_process(spec: ProbeSpec, ctx: ProbeContext) -> Finding:
    try:
        finding = probes.load_probe(spec.module)(ctx)
        if not isinstance(finding, Finding):
            raise TypeError(f"probe returned {type(finding).__name__}, not a Finding")
    except Exception as exc:
        return _crash(spec, exc_line(exc))
    finding.id = spec.id
    return finding


def _run_in_subprocess(spec: ProbeSpec, worker_argv: WorkerArgv, ctx: ProbeContext) -> Finding:
    env = dict(os.environ)
    env[SETTINGS_ENV] = json.dumps(ctx.settings())
    env["PYTHONPATH"] = os.pathsep.join(p for p in [_PROBES_ROOT, env.get("PYTHONPATH")] if p)
    # Own session, so a timeout kills the probe's children (nvidia-smi, compile workers) too.
    proc = subprocess.Popen(worker_argv(spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=spec.timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        return _crash(spec, f"timed out after {spec.timeout_s:g} s", _tail(err))
    if proc.returncode != 0:
        return _crash(spec, _signal_reason(proc.returncode, err), _tail(err))
    lines = [line for line in (out or "").splitlines() if line.strip()]
    try:
        finding = Finding.from_dict(json.loads(lines[-1]))
    except (IndexError, ValueError, TypeError) as exc:
        return _crash(spec, f"unreadable worker output ({exc_line(exc)}): {_last_line(err)}", _tail(err))
    finding.id = spec.id
    return finding


def _signal_reason(returncode: int, err: str) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}: {_last_line(err)}"


class _GroupWorker:
    """One worker process running several probes in order (`python -m probes._worker --group`).

    Started early when `wait` is set: it imports torch, then blocks until `release()`, so the timing probes'
    import cost overlaps the other probes without any of their GPU work overlapping."""

    def __init__(self, specs: list[ProbeSpec], ctx: ProbeContext, wait: bool = False):
        self.specs = specs
        env = dict(os.environ)
        env[SETTINGS_ENV] = json.dumps(ctx.settings())
        env["PYTHONPATH"] = os.pathsep.join(p for p in [_PROBES_ROOT, env.get("PYTHONPATH")] if p)
        argv = [sys.executable, "-P", "-m", "probes._worker", "--group",
                ",".join(f"{spec.id}={spec.module}" for spec in specs)] + (["--wait"] if wait else [])
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        if not wait:
            self.proc.stdin.close()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def release(self) -> None:
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the worker is already gone: collect() reports how

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def collect(self) -> tuple[dict[str, Finding], list[ProbeSpec]]:
        """Findings in order until the worker finishes, dies or a probe outlives its timeout; the probe in
        flight then is a crash, and the probes after it are returned to be run alone."""
        findings: dict[str, Finding] = {}
        for index, spec in enumerate(self.specs):
            started = time.perf_counter()
            try:
                line = self.lines.get(timeout=spec.timeout_s)
            except queue.Empty:
                self._kill()
                err = "".join(self.stderr)
                findings[spec.id] = _crash(spec, f"timed out after {spec.timeout_s:g} s", _tail(err))
                findings[spec.id].elapsed_s = round(time.perf_counter() - started, 3)
                return findings, self.specs[index + 1:]
            if line is None:
                self.proc.wait()
                time.sleep(0.05)  # let the stderr reader drain
                err = "".join(self.stderr)
                findings[spec.id] = _crash(spec, _signal_reason(self.proc.returncode, err), _tail(err))
                findings[spec.id].elapsed_s = round(time.perf_counter() - started, 3)
                return findings, self.specs[index + 1:]
            try:
                finding = Finding.from_dict(json.loads(line))
            except (ValueError, TypeError) as exc:
                finding = _crash(spec, f"unreadable worker output ({exc_line(exc)})")
            finding.id = spec.id
            findings[spec.id] = finding
        self.proc.wait()
        return findings, []


def run_probes(ids: Sequence[str] | None = None, ctx: ProbeContext | None = None, in_subprocess: bool = True,
               jobs: int = min(16, os.cpu_count() or 1), *, registry: Sequence[ProbeSpec] | None = None,
               worker_argv: WorkerArgv | None = None) -> list[Finding]:
    """Run the probes (all, or those in `ids`) concurrently; return their Findings in registry order.

    Native probes run in a subprocess (`worker_argv(spec)`, default `python -m probes._worker`) with the
    spec's timeout, and always with a default ProbeContext; `ctx` is for in-process probes (all of them when
    `in_subprocess` is False). A probe never raises out of here: it becomes a `crash` Finding.
    """
    registry = list(PROBES if registry is None else registry)
    known = [spec.id for spec in registry]
    for probe_id in ids or []:
        if probe_id not in known:
            raise UsageError(f"unknown probe {probe_id!r}; known: {', '.join(known)}")
    ctx = ctx or ProbeContext()
    # Bench-tier probes spend tens of seconds measuring: they run with --bench, or when named with --only.
    selected = [spec for spec in registry
                if (spec.id in ids if ids else spec.tier == "quick" or ctx.bench)]
    worker_argv = worker_argv or default_worker_argv

    def timed(spec: ProbeSpec) -> Finding:
        start = time.perf_counter()
        try:
            if spec.native and in_subprocess:
                finding = _run_in_subprocess(spec, worker_argv, ctx)
            else:
                finding = _run_in_process(spec, ctx)
        except Exception as exc:  # the runner itself failed (e.g. could not start the worker)
            finding = _crash(spec, exc_line(exc))
        finding.elapsed_s = round(time.perf_counter() - start, 3)
        return finding

    if not selected:
        return []
    # Grouped workers serve the real probes; an injected worker (tests' fakes of a broken worker) runs each
    # probe alone, as does any probe without a group.
    grouping = in_subprocess and worker_argv is default_worker_argv
    results: dict[str, Finding] = {}
    exclusive = [spec for spec in selected if spec.exclusive]
    timing_worker = None
    if grouping and exclusive and all(spec.native for spec in exclusive):
        timing_worker = _GroupWorker(exclusive, ctx, wait=True)
    shared = [spec for spec in selected if not spec.exclusive]
    groups: dict[str, list[ProbeSpec]] = {}
    alone: list[ProbeSpec] = []
    for spec in shared:
        if grouping and spec.native and spec.group:
            groups.setdefault(spec.group, []).append(spec)
        else:
            alone.append(spec)

    def run_group(specs: list[ProbeSpec]) -> dict[str, Finding]:
        try:
            found, rest = _GroupWorker(specs, ctx).collect()
        except Exception:  # the worker could not start: each probe alone, where the error is reported
            found, rest = {}, specs
        for spec in rest:
            found[spec.id] = timed(spec)
        return found

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        group_futures = [pool.submit(run_group, specs) for specs in groups.values()]
        results.update(zip((spec.id for spec in alone), pool.map(timed, alone)))
        for future in group_futures:
            results.update(future.result())
    if timing_worker is not None:
        timing_worker.release()
        found, rest = timing_worker.collect()
        results.update(found)
        for spec in rest:
            results[spec.id] = timed(spec)
    else:
        for spec in exclusive:
            results[spec.id] = timed(spec)
    return [results[spec.id] for spec in selected]  # the registry's order


def exit_code(findings: Sequence[Finding]) -> int:
    """0 when no finding is fail or crash, else 1."""
    return EXIT_FAILURE if any(f.status in FAILING_STATUSES for f in findings) else EXIT_OK


MARKS = {"ok": "[✓]", "warn": "[!]", "fail": "[✗]", "skip": "[-]", "crash": "[☠]"}
ASCII_MARKS = {"ok": "[ok]", "warn": "[!]", "fail": "[x]", "skip": "[-]", "crash": "[crash]"}
ISSUE_STATUSES = ("warn", "fail", "crash")


def render(findings: Sequence[Finding], verbose: bool = False, ascii_only: bool = False) -> str:
    """flutter-doctor style report: one line per finding, its fix for warn/fail/crash, details with -v."""
    marks = ASCII_MARKS if ascii_only else MARKS
    lines = []
    for f in findings:
        line = f"{marks[f.status]} {f.id}: {f.summary}"
        if verbose and f.elapsed_s is not None:
            line += f" ({f.elapsed_s:.1f} s)"
        lines.append(line)
        if f.status in ISSUE_STATUSES and f.fix:
            lines.append(f"    fix: {f.fix}")
        if verbose:
            lines.extend(f"    • {d}" if not ascii_only else f"    - {d}" for d in f.details)
    counts = {s: sum(f.status == s for f in findings) for s in ISSUE_STATUSES}
    issues = sum(counts.values())
    skipped = sum(f.status == "skip" for f in findings)
    if issues:
        parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        footer = f"{issues} issue{'s' if issues != 1 else ''} found ({parts})"
    else:
        footer = "No issues found"
    if skipped:
        footer += f"; {skipped} skipped"
    lines += ["", footer]
    return "\n".join(lines)


def to_json(findings: Sequence[Finding]) -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, "findings": [f.to_dict() for f in findings],
                       "exit_code": exit_code(findings)}, indent=2, default=str)


def _can_print_unicode() -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "✓✗☠•".encode(encoding)
        return True
    except (UnicodeEncodeError, LookupError):
        return False


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON (schema_version 1).")
@click.option("--only", "only", multiple=True, metavar="ID", help="Run only this probe (repeatable).")
@click.option("--list", "list_probes", is_flag=True, help="List the probe ids and exit.")
@click.option("-v", "--verbose", is_flag=True, help="Show each finding's details and timing.")
@click.option("--bench", is_flag=True, help="Also run the measuring tier (GEMM and bandwidth roofline).")
@click.option("--width", type=int, default=1328, show_default=True, help="Workload width the probes size for.")
@click.option("--height", type=int, default=1328, show_default=True, help="Workload height the probes size for.")
@click.option("--model", default="Qwen/Qwen-Image", show_default=True,
              help="Model the model and memory probes look for (a local path or Hugging Face id).")
def check(as_json: bool, only: tuple[str, ...], list_probes: bool, verbose: bool, bench: bool, width: int,
          height: int, model: str) -> None:
    """Probe this machine and say what Qwen-Image can use here. Exit 0: nothing fails; 1: a probe
    failed or crashed; 2: usage error."""
    if list_probes:
        id_width = max(len(spec.id) for spec in PROBES)
        for spec in PROBES:
            click.echo(f"{spec.id:<{id_width}}  {spec.title}" + ("  [--bench]" if spec.tier == "bench" else ""))
        return
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 16:
            raise UsageError(f"--{name} must be a positive multiple of 16, got {value}")
    ctx = ProbeContext(workload=Workload(width=width, height=height), model=model, bench=bench)
    findings = run_probes(ids=list(only) or None, ctx=ctx)  # UsageError for an unknown id, before anything runs
    click.echo(to_json(findings) if as_json else render(findings, verbose=verbose,
                                                         ascii_only=not _can_print_unicode()))
    # click's Exit, not SystemExit: works standalone, under CliRunner and under cli.main(standalone_mode=False).
    click.get_current_context().exit(exit_code(findings))
