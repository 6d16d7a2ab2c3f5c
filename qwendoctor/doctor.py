"""`qwendoctor check`: run the probes (each native import in a worker process, a crash its own status) and
print their report (`qwendoctor/doctor_report.py` renders it and decides the exit code).

Exit code: 0 when no finding is fail or crash, 1 otherwise (warn and skip do not fail the run),
2 for usage errors (an unknown probe id).

A probe that cannot run because a package does not import says so as a `skip` naming the finding that reports
the failure (measured["blocked_by"], probes.imports): the failure counts once, there. Where that finding is not
in the run, or saw nothing wrong, the blocked probe is a `fail` itself, so a broken import never exits 0.
"""

from __future__ import annotations

import dataclasses
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
from probes._worker import GATE_REQUEST
from probes.context import (
    SETTINGS_ENV,
    TRACE_ENV,
    TRACE_T0_ENV,
    ProbeContext,
    exc_line,
)
from probes.finding import FAILING_STATUSES, Finding
from probes.imports import crash_fix
from probes.workload import Workload
from qwendoctor.doctor_report import (  # noqa: F401  (the report's names, where they always were)
    _arrivals,
    _can_print_unicode,
    exit_code,
    render,
    to_json,
)
from qwendoctor.errors import UsageError

# Attention backends qwendoctor adds to diffusers' dispatcher: the probes check and time them like diffusers' own.
ATTENTION_REGISTRARS = {"fa4": "qwendoctor.levers.attention:register_fa4_backend",
                        "sageattn": "qwendoctor.levers.attention:register_sageattn_backend"}
# The directory holding the `probes` package: put on the worker's PYTHONPATH so it imports from any cwd.
_PROBES_ROOT = str(Path(probes.__file__).resolve().parent.parent)

WorkerArgv = Callable[[ProbeSpec], list[str]]


def default_worker_argv(spec: ProbeSpec) -> list[str]:
    # -P: do not put the cwd on sys.path, so a stray `probes/` in the user's cwd cannot shadow ours.
    return [sys.executable, "-P", "-m", "probes._worker", spec.id, "--module", spec.module]


def _crash(spec: ProbeSpec, reason: str, details: list[str] | None = None, fix: str | None = None) -> Finding:
    return Finding(id=spec.id, status="crash", summary=reason, details=details or [],
                   fix=fix or f"run `python -m probes._worker {spec.id}` to see the full output")


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
        return _crash(spec, exc_line(exc), fix=crash_fix(spec.id, exc))
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


# With TRACE_ENV set to a file, the runner appends when each worker starts, asks for the GPU, gets it, and when
# each finding arrives (JSON lines, seconds since _T0); workers add their probes' phases (probes.context.mark).
_T0 = time.perf_counter()


def _trace(event: str, **fields) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps({"t": round(time.perf_counter() - _T0, 3), "event": event, **fields}) + "\n")
        except OSError:
            pass  # checked writable at the start (run_probes); a disk filling up later costs the trace, not the report


WARM_UP_TIMEOUT_S = 120.0  # a timing worker's torch import and CUDA context, before its first probe


class _GpuGate:
    """The GPU as a readers-writer lock between worker processes: probes that launch kernels hold it shared,
    a timing probe holds it alone. A waiting timing probe goes before probes that ask after it, so it starts
    as soon as the probes already on the GPU finish; the imports of everyone else overlap it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    def acquire(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._exclusive_waiting += 1
                while self._exclusive or self._shared:
                    self._cond.wait()
                self._exclusive_waiting -= 1
                self._exclusive = True
            else:
                while self._exclusive or self._exclusive_waiting:
                    self._cond.wait()
                self._shared += 1

    def release(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._exclusive = False
            else:
                self._shared -= 1
            self._cond.notify_all()


class _GroupWorker:
    """One worker process running several probes in order (`python -m probes._worker --group`).

    With a gate, the worker asks for the GPU (a `#gpu` line) before a probe launches kernels, and `collect`
    answers once `gate` allows: shared for ordinary probes, exclusive for timing probes (whose worker asks
    before each probe, after importing torch and creating its CUDA context). Time spent waiting for the GPU
    does not count against a probe's timeout."""

    def __init__(self, specs: list[ProbeSpec], ctx: ProbeContext, gate: _GpuGate | None = None,
                 exclusive: bool = False):
        self.specs = specs
        self.gate, self.exclusive = gate, exclusive
        env = dict(os.environ)
        env[SETTINGS_ENV] = json.dumps(ctx.settings())
        env["PYTHONPATH"] = os.pathsep.join(p for p in [_PROBES_ROOT, env.get("PYTHONPATH")] if p)
        argv = [sys.executable, "-P", "-m", "probes._worker", "--group",
                ",".join(f"{spec.id}={spec.module}" for spec in specs)]
        if gate is not None:
            argv += ["--gate", "exclusive" if exclusive else "shared"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
        _trace("worker", probes=[spec.id for spec in specs], gate=argv[-1] if gate is not None else None)
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        if gate is None:
            self.proc.stdin.close()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _answer(self) -> None:
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the worker is already gone: collect() reports how

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def _finish(self) -> None:
        if self.gate is not None:
            try:
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError, OSError):
                pass
        self.proc.wait()

    def collect(self) -> tuple[dict[str, Finding], list[ProbeSpec]]:
        """Findings in order until the worker finishes, dies or a probe outlives its timeout; the probe in
        flight then is a crash, and the probes after it are returned to be run alone."""
        findings: dict[str, Finding] = {}
        held = False
        try:
            for index, spec in enumerate(self.specs):
                started = time.perf_counter()
                # A timing worker asks for the GPU before each probe; before its first, it imports torch and
                # creates its CUDA context, which the probe's own timeout does not cover.
                warming = self.exclusive and self.gate is not None
                limit = max(spec.timeout_s, WARM_UP_TIMEOUT_S) if warming else spec.timeout_s
                deadline = started + limit
                while True:
                    try:
                        line = self.lines.get(timeout=max(0.0, deadline - time.perf_counter()))
                    except queue.Empty:
                        line = ""
                    if line is not None and line.strip() == GATE_REQUEST and self.gate is not None and not held:
                        asked = time.perf_counter()
                        _trace("gpu_asked", probe=spec.id)
                        self.gate.acquire(self.exclusive)
                        _trace("gpu_granted", probe=spec.id)
                        held = True
                        # A timing probe's clock starts now (its worker's warm-up came before); another probe
                        # does not pay for the wait.
                        now = time.perf_counter()
                        deadline = now + spec.timeout_s if self.exclusive else deadline + now - asked
                        warming = False
                        self._answer()
                        continue
                    break
                if line == "":
                    self._kill()
                    err = "".join(self.stderr)
                    why = f"timed out after {spec.timeout_s:g} s" if not warming else \
                        f"timed out after {limit:g} s before it began (its worker importing torch)"
                    findings[spec.id] = _crash(spec, why, _tail(err))
                    findings[spec.id].elapsed_s = round(time.perf_counter() - started, 3)
                    _announce(findings[spec.id])
                    return findings, self.specs[index + 1:]
                if line is None:
                    self.proc.wait()
                    time.sleep(0.05)  # let the stderr reader drain
                    err = "".join(self.stderr)
                    findings[spec.id] = _crash(spec, _signal_reason(self.proc.returncode, err), _tail(err))
                    findings[spec.id].elapsed_s = round(time.perf_counter() - started, 3)
                    _announce(findings[spec.id])
                    return findings, self.specs[index + 1:]
                try:
                    finding = Finding.from_dict(json.loads(line))
                except (ValueError, TypeError) as exc:
                    finding = _crash(spec, f"unreadable worker output ({exc_line(exc)})")
                finding.id = spec.id
                findings[spec.id] = finding
                _trace("finding", probe=spec.id, status=finding.status, elapsed_s=finding.elapsed_s)
                _announce(finding)
                if held:  # the probe is over: the GPU is free again
                    self.gate.release(self.exclusive)
                    held = False
            self._finish()
            return findings, []
        finally:
            if held:  # the worker died or was killed holding the GPU
                self.gate.release(self.exclusive)


# Called with each finding as it arrives (`on_finding` of run_probes), from the runner's threads.
_ON_FINDING: Callable[[Finding], None] | None = None
_ANNOUNCE_LOCK = threading.Lock()


def _announce(finding: Finding) -> None:
    if _ON_FINDING is not None:
        with _ANNOUNCE_LOCK:
            _ON_FINDING(finding)


def selected_probes(ids: Sequence[str] | None, registry: Sequence[ProbeSpec], bench: bool) -> list[ProbeSpec]:
    """The probes a run executes: those named, else the quick tier (and the bench tier with --bench)."""
    # Bench-tier probes spend tens of seconds measuring: they run with --bench, or when named with --only.
    return [spec for spec in registry if (spec.id in ids if ids else spec.tier == "quick" or bench)]


def run_probes(ids: Sequence[str] | None = None, ctx: ProbeContext | None = None, in_subprocess: bool = True,
               jobs: int = min(16, os.cpu_count() or 1), *, registry: Sequence[ProbeSpec] | None = None,
               worker_argv: WorkerArgv | None = None,
               on_finding: Callable[[Finding], None] | None = None) -> list[Finding]:
    """Run the probes (all, or those in `ids`) concurrently; return their Findings in registry order.

    Native probes run in a subprocess (`worker_argv(spec)`, default `python -m probes._worker`) with the
    spec's timeout, and always with a default ProbeContext; `ctx` is for in-process probes (all of them when
    `in_subprocess` is False). A probe never raises out of here: it becomes a `crash` Finding.

    Exclusive (timing) probes never share the GPU with another probe's kernels. With the real grouped
    workers that is a gate: their worker starts at once, and each timing probe begins as soon as no other
    probe is on the GPU, while the others import their libraries. Otherwise they run after all the others.
    """
    global _T0, _ON_FINDING
    _T0 = time.perf_counter()
    _ON_FINDING = on_finding
    if os.environ.get(TRACE_ENV):
        try:
            # O_NONBLOCK: a FIFO nobody reads is refused (ENXIO) instead of blocking the check forever.
            os.close(os.open(os.environ[TRACE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666))
        except OSError as error:
            raise UsageError(f"{TRACE_ENV}={os.environ[TRACE_ENV]}: {error.strerror or error}; unset it or name a "
                             "file that can be written") from None
        os.environ[TRACE_T0_ENV] = repr(_T0)  # the workers' clock origin (they inherit the environment)
    registry = list(PROBES if registry is None else registry)
    known = [spec.id for spec in registry]
    for probe_id in ids or []:
        if probe_id not in known:
            raise UsageError(f"unknown probe {probe_id!r}; known: {', '.join(known)}")
    ctx = ctx or ProbeContext()
    ctx = dataclasses.replace(ctx, attention_registrars={**ATTENTION_REGISTRARS, **ctx.attention_registrars})
    selected = selected_probes(ids, registry, ctx.bench)
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
        _trace("finding", probe=spec.id, status=finding.status, elapsed_s=finding.elapsed_s, alone=True)
        _announce(finding)
        return finding

    if not selected:
        return []
    # Grouped workers serve the real probes; an injected worker (tests' fakes of a broken worker) runs each
    # probe alone, as does any probe without a group.
    grouping = in_subprocess and worker_argv is default_worker_argv
    gate = _GpuGate() if grouping else None

    def gated(spec: ProbeSpec, exclusive: bool) -> Finding:
        """A native probe run alone while `gate` is held: it cannot tell the runner when it uses the GPU."""
        if gate is None or not (spec.native and in_subprocess):
            return timed(spec)
        gate.acquire(exclusive)
        try:
            return timed(spec)
        finally:
            gate.release(exclusive)

    results: dict[str, Finding] = {}
    exclusive = [spec for spec in selected if spec.exclusive]
    gated_timing = grouping and exclusive and all(spec.native for spec in exclusive)
    timing_worker = None
    if gated_timing:
        try:
            timing_worker = _GroupWorker(exclusive, ctx, gate, exclusive=True)
        except Exception:  # could not start: they run alone after the others, where the error is reported
            timing_worker = None
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
            found, rest = _GroupWorker(specs, ctx, gate).collect()
        except Exception:  # the worker could not start: each probe alone, where the error is reported
            found, rest = {}, specs
        for spec in rest:
            found[spec.id] = gated(spec, exclusive=False)
        return found

    def run_timing() -> dict[str, Finding]:
        found, rest = timing_worker.collect()
        for spec in rest:
            found[spec.id] = gated(spec, exclusive=True)
        return found

    # A thread per worker process, all started at once: the threads only wait on pipes, and the processes
    # (a few) share the CPUs. Probes run alone share `jobs` threads.
    with ThreadPoolExecutor(max_workers=len(groups) + 1) as workers, \
            ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        timing_future = workers.submit(run_timing) if timing_worker is not None else None
        group_futures = [workers.submit(run_group, specs) for specs in groups.values()]
        results.update(zip((spec.id for spec in alone), pool.map(lambda spec: gated(spec, False), alone)))
        for future in group_futures:
            results.update(future.result())
        if timing_future is not None:
            results.update(timing_future.result())
    if timing_worker is None:
        for spec in exclusive:
            results[spec.id] = timed(spec)
    return settle_blocked([results[spec.id] for spec in selected])  # the registry's order


def settle_blocked(findings: list[Finding]) -> list[Finding]:
    """A probe blocked by an import failure stays a skip, pointing at the finding that reports the failure,
    when that finding is in this run and failing; otherwise the blocked probe itself fails."""
    by_id = {finding.id: finding for finding in findings}
    for finding in findings:
        source = finding.measured.get("blocked_by") if finding.status == "skip" else None
        if not source:
            continue
        reporter = by_id.get(source)
        if reporter is not None and reporter.status in ("warn", *FAILING_STATUSES):
            finding.summary += f" (see {source})"
        else:
            finding.status = "fail"
            finding.details.append(f"fails here: the {source} probe " + (
                "is not in this run" if reporter is None else f"reported {reporter.status}, not this failure"))
    return findings


def _has_nvidia_gpu() -> bool:
    """Whether NVML sees a GPU: the machine's answer without importing torch (the probes import it later)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU to size for
        return False


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON (schema_version 1).")
@click.option("--only", "only", multiple=True, metavar="ID", help="Run only this probe (repeatable).")
@click.option("--list", "list_probes", is_flag=True, help="List the probe ids and exit.")
@click.option("-v", "--verbose", is_flag=True, help="Show each finding's details and timing.")
@click.option("--bench", is_flag=True, help="Also run the measuring tier (GEMM and bandwidth roofline).")
@click.option("--width", type=int, help="Workload width the probes size for [tiny: 128, else 1328].")
@click.option("--height", type=int, help="Workload height the probes size for [tiny: 128, else 1328].")
@click.option("--memory-limit", type=float, help="GiB of GPU memory to plan for (memory_plan sizes its plans for "
              "this much of the card, as tune --memory-limit would run them) [the whole card].")
@click.option("--model", help="Model the model and memory probes look for (tiny, synthetic, a local path or a "
              "Hugging Face id) [Qwen/Qwen-Image with an NVIDIA GPU, else tiny: what tune and generate run here].")
def check(as_json: bool, only: tuple[str, ...], list_probes: bool, verbose: bool, bench: bool, width: int,
          height: int, memory_limit: float | None, model: str) -> None:
    """Probe this machine and say what Qwen-Image can use here. Exit 0: nothing fails; 1: a probe
    failed or crashed; 2: usage error."""
    if list_probes:
        id_width = max(len(spec.id) for spec in PROBES)
        for spec in PROBES:
            click.echo(f"{spec.id:<{id_width}}  {spec.title}" + ("  [--bench]" if spec.tier == "bench" else ""))
        return
    from probes import limits

    for name, value in (("width", width), ("height", height)):
        if value is not None:
            try:
                limits.check(name, value, label=f"--{name}")  # the ranges tune, bench and locks use
            except limits.RangeError as error:
                raise UsageError(str(error)) from None
    if memory_limit is not None:
        from qwendoctor.levers import memory

        memory.check_against_card(memory_limit, memory.card_total_gib())
    model = model or ("Qwen/Qwen-Image" if _has_nvidia_gpu() else "tiny")
    from qwendoctor.models import default_side

    size = default_side(model)
    width, height = width or size, height or size
    ctx = ProbeContext(workload=Workload(model=model, width=width, height=height, memory_limit_gib=memory_limit),
                       model=model, bench=bench)
    with _arrivals(len(selected_probes(list(only) or None, PROBES, bench)), quiet=as_json) as on_finding:
        # UsageError for an unknown id, before anything runs
        findings = run_probes(ids=list(only) or None, ctx=ctx, on_finding=on_finding)
    click.echo(to_json(findings) if as_json else render(findings, verbose=verbose,
                                                         ascii_only=not _can_print_unicode()))
    # click's Exit, not SystemExit: works standalone, under CliRunner and under cli.main(standalone_mode=False).
    click.get_current_context().exit(exit_code(findings))
