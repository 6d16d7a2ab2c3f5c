"""The runner (crash classification, timeouts, order), exit codes, rendering, JSON and the click command."""

from __future__ import annotations

import json
import sys
import time

import pytest
from click.testing import CliRunner

from probes import PROBES, ProbeSpec
from probes.finding import Finding
from qwendoctor import doctor
from qwendoctor.doctor import check, exit_code, render, run_probes, to_json
from qwendoctor.errors import EXIT_USAGE, UsageError


def spec(probe_id, module, native=False, timeout_s=30.0):
    return ProbeSpec(probe_id, f"tests.fake_probes.{module}", native, timeout_s, f"fake {module}")


def one(registry, **kw):
    [finding] = run_probes(registry=registry, **kw)
    return finding


def test_in_process_exception_becomes_crash():
    f = one([spec("boom", "raises")])
    assert f.status == "crash" and f.summary == "RuntimeError: boom" and f.fix
    assert f.elapsed_s is not None


def test_subprocess_abort_is_crash_naming_the_signal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the worker must not depend on the cwd
    f = one([spec("aborts", "abort", native=True)])
    assert f.status == "crash" and f.summary == "killed by SIGABRT"
    assert "probes._worker aborts" in f.fix


def test_subprocess_hang_times_out():
    start = time.perf_counter()
    f = one([spec("hangs", "hang", native=True, timeout_s=2)])
    assert f.status == "crash" and f.summary == "timed out after 2 s"
    assert 2 <= f.elapsed_s < 10 and time.perf_counter() - start < 10


def test_subprocess_nonzero_exit_reports_last_stderr_line():
    f = one([spec("exits", "exits", native=True)])
    assert f.status == "crash"
    assert f.summary == "exited with code 3: ImportError: libcudart.so.13: cannot open shared object file"


def test_subprocess_exception_and_stdout_noise():
    boom, noisy = run_probes(registry=[spec("boom", "raises", native=True), spec("noisy", "noisy", native=True)])
    assert boom.status == "crash" and boom.summary == "RuntimeError: boom" and boom.details
    assert noisy.status == "ok" and noisy.id == "noisy" and noisy.summary == "printed, still parsed"


def test_unparsable_worker_output_is_crash():
    argv = lambda s: [sys.executable, "-c", "import sys; print('not json'); print('oops', file=sys.stderr)"]
    f = one([spec("garbage", "good", native=True)], worker_argv=argv)
    assert f.status == "crash" and f.summary.startswith("unreadable worker output") and f.summary.endswith("oops")


def test_in_subprocess_false_runs_native_probes_in_process():
    f = one([spec("good", "good", native=True)], in_subprocess=False)
    assert f.status == "ok" and f.id == "good"


@pytest.mark.parametrize("native", [False, True])
def test_a_crash_on_a_missing_module_names_it_and_the_pip_command(native):
    f = one([spec("imp", "import_error", native=native)])
    assert f.status == "crash" and f.summary == "ModuleNotFoundError: No module named 'qdtest_nowhere_to_be_found'"
    assert f.fix.startswith("python -m pip install qdtest-nowhere-to-be-found (no module named "
                            "'qdtest_nowhere_to_be_found'")
    assert f.fix.endswith("then run `python -m probes._worker imp` to see the full output")


@pytest.mark.parametrize("imports_module, status", [("failing", "skip"), (None, "fail"), ("good", "fail")])
def test_a_blocked_probe_points_at_the_import_failure_or_fails_itself(imports_module, status):
    """The failure counts once, where the imports probe reports it; without that report the blocked probe
    fails, so a broken import never exits 0."""
    registry = [spec("imports", imports_module)] if imports_module else []
    findings = run_probes(registry=registry + [spec("blocked", "blocked")])
    blocked = findings[-1]
    assert blocked.status == status and blocked.fix == "python -m pip install x"
    if status == "skip":
        assert blocked.summary == "blocked: diffusers does not import: no module named 'x' (see imports)"
    else:
        assert blocked.summary == "blocked: diffusers does not import: no module named 'x'"
        assert blocked.details[-1].startswith("fails here: the imports probe ")
    assert exit_code(findings) == 1


def test_fixed_order_despite_concurrency():
    registry = [spec("slow1", "slow"), spec("good", "good"), spec("slow2", "slow"), spec("fail", "failing"),
                spec("slow3", "slow")]
    start = time.perf_counter()
    findings = run_probes(registry=registry, jobs=5)
    wall = time.perf_counter() - start
    assert [f.id for f in findings] == ["slow1", "good", "slow2", "fail", "slow3"]
    assert findings[0].elapsed_s >= 0.5 > findings[1].elapsed_s
    assert wall < 1.4  # three 0.5 s probes ran concurrently


def test_only_selects_and_unknown_id_is_usage_error():
    registry = [spec("good", "good"), spec("fail", "failing")]
    assert [f.id for f in run_probes(["fail"], registry=registry)] == ["fail"]
    with pytest.raises(UsageError, match="unknown probe 'nope'; known: good, fail") as err:
        run_probes(["nope"], registry=registry)
    assert err.value.exit_code == EXIT_USAGE == 2


@pytest.mark.parametrize("statuses, code", [
    ([], 0), (["ok"], 0), (["ok", "warn", "skip"], 0), (["ok", "fail"], 1), (["crash"], 1), (["warn", "crash"], 1),
])
def test_exit_code_rule(statuses, code):
    assert exit_code([Finding(id=f"p{i}", status=s, summary="x") for i, s in enumerate(statuses)]) == code


FINDINGS = [
    Finding(id="system", status="ok", summary="fine", details=["detail-ok"], fix="never shown", elapsed_s=0.01),
    Finding(id="gpu", status="skip", summary="no NVIDIA GPU (NVML not available)"),
    Finding(id="torch_build", status="fail", summary="CPU-only build", details=["detail-fail"],
            fix="pip install torch --index-url https://download.pytorch.org/whl/cu128"),
    Finding(id="diffusers", status="warn", summary="old", fix='pip install -U "diffusers>=0.35"'),
    Finding(id="attention_backends", status="crash", summary="killed by SIGSEGV", fix="run the worker"),
]


def test_render_marks_fixes_details_and_footer():
    text = render(FINDINGS)
    lines = text.splitlines()
    assert lines[0] == "[✓] system: fine"
    assert "[-] gpu: no NVIDIA GPU (NVML not available)" in lines
    assert "[✗] torch_build: CPU-only build" in lines
    assert "[!] diffusers: old" in lines
    assert "[☠] attention_backends: killed by SIGSEGV" in lines
    assert "    fix: pip install torch --index-url https://download.pytorch.org/whl/cu128" in lines
    assert "    fix: run the worker" in lines
    assert "never shown" not in text and "detail-fail" not in text
    assert lines[-1] == "3 issues found (1 warn, 1 fail, 1 crash); 1 skipped"

    verbose = render(FINDINGS, verbose=True)
    assert "    • detail-fail" in verbose and "    • detail-ok" in verbose and "(0.0 s)" in verbose
    assert "[crash] attention_backends" in render(FINDINGS, ascii_only=True)
    assert render(FINDINGS[:1]).splitlines()[-1] == "No issues found"
    assert render(FINDINGS[2:3] + FINDINGS[4:]).splitlines()[-1] == "2 issues found (1 fail, 1 crash)"


def test_to_json_schema():
    data = json.loads(to_json(FINDINGS))
    assert set(data) == {"schema_version", "findings", "exit_code"}
    assert data["schema_version"] == 1 and data["exit_code"] == 1
    assert [f["id"] for f in data["findings"]] == [f.id for f in FINDINGS]
    for f in data["findings"]:
        assert set(f) == {"id", "status", "summary", "details", "fix", "measured", "elapsed_s"}


# --- the click command (fake registry, so nothing heavy runs) ----------------------------------------

@pytest.fixture
def fake_registry(monkeypatch):
    registry = [spec("good", "good"), spec("fail", "failing"), spec("slow", "slow")]
    monkeypatch.setattr(doctor, "PROBES", registry)
    return registry


def test_cli_list_uses_the_real_registry():
    result = CliRunner().invoke(check, ["--list"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == [p.id for p in PROBES]


def test_cli_json(fake_registry):
    result = CliRunner().invoke(check, ["--json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["exit_code"] == 1 and [f["id"] for f in data["findings"]] == ["good", "fail", "slow"]
    assert all(f["elapsed_s"] is not None for f in data["findings"])


def test_cli_only_and_verbose(fake_registry):
    result = CliRunner().invoke(check, ["--only", "good", "--only", "slow", "-v"])
    assert result.exit_code == 0, result.output
    assert "good: all good" in result.output and "fail" not in result.output
    assert "fix: be patient" in result.output
    assert result.output.splitlines()[-1] == "1 issue found (1 warn)"


def test_cli_only_unknown_is_usage_error(fake_registry):
    result = CliRunner().invoke(check, ["--only", "nope"])
    assert result.exit_code != 0 and result.output == ""
    assert isinstance(result.exception, UsageError) and result.exception.exit_code == 2
    assert str(result.exception) == "unknown probe 'nope'; known: good, fail, slow"


def test_console_entry_point_turns_unknown_id_into_one_line_and_exit_2(capsys):
    from qwendoctor.cli import main

    with pytest.raises(SystemExit) as done:
        main(["check", "--only", "nope"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qwendoctor: error: unknown probe 'nope'; known: system, gpu, topology, torch_build")
    assert "\n" not in err


def grouped(probe_id, module, group, timeout_s=30.0, exclusive=False):
    return ProbeSpec(probe_id, f"tests.fake_probes.{module}", True, timeout_s, f"fake {module}", group=group,
                     exclusive=exclusive)


def test_a_group_runs_in_one_worker_process():
    a, b, c = run_probes(registry=[grouped("a", "whoami", "g"), grouped("b", "whoami", "g"),
                                   grouped("c", "whoami", "other")])
    assert a.status == b.status == c.status == "ok"
    assert a.measured["pid"] == b.measured["pid"] != c.measured["pid"]
    assert a.measured["started"] <= b.measured["started"]  # registry order inside the group
    assert a.elapsed_s is not None and b.elapsed_s is not None


def test_a_probe_that_kills_its_group_worker_is_a_crash_and_the_rest_run_alone():
    before, abort, after, later = run_probes(registry=[
        grouped("before", "whoami", "g"), grouped("abort", "abort", "g"), grouped("after", "whoami", "g"),
        grouped("later", "good", "g")])
    assert before.status == "ok"
    assert abort.status == "crash" and abort.summary == "killed by SIGABRT"
    assert after.status == "ok" and later.status == "ok"
    assert after.measured["pid"] != before.measured["pid"]  # a fresh process, not the dead worker


def test_a_probe_that_hangs_in_a_group_times_out_and_the_rest_still_run():
    hang, after = run_probes(registry=[grouped("hang", "hang", "g", timeout_s=1.0), grouped("after", "good", "g")])
    assert hang.status == "crash" and hang.summary == "timed out after 1 s"
    assert after.status == "ok"


def test_grouped_exception_and_unparsable_outputs_stay_per_probe():
    boom, fine = run_probes(registry=[grouped("boom", "raises", "g"), grouped("fine", "good", "g")])
    assert boom.status == "crash" and boom.summary == "RuntimeError: boom" and fine.status == "ok"


def _disjoint(a, b):
    return a.measured["ended"] <= b.measured["started"] or b.measured["ended"] <= a.measured["started"]


def test_a_timing_probe_never_shares_the_gpu_with_another_probes_kernels(monkeypatch):
    monkeypatch.setenv("GPU_WINDOW_S", "0.5")
    a, b, timing = run_probes(registry=[grouped("a", "gpu_window", "g"), grouped("b", "gpu_window", "h"),
                                        grouped("timing", "gpu_window", None, exclusive=True)])
    assert a.status == b.status == timing.status == "ok"
    assert _disjoint(timing, a) and _disjoint(timing, b)


def test_the_timing_probe_overlaps_the_others_imports_but_not_their_gpu_work(tmp_path, monkeypatch):
    """The waiting probe sees the timing probe's mark before it asks for the GPU (so its non-GPU part ran
    during the timing), and gets the GPU only once the timing probe is done."""
    monkeypatch.setenv("QWENDOCTOR_TEST_MARK", str(tmp_path / "mark"))
    monkeypatch.setenv("WAITS_THEN_USES_GPU", "1")
    monkeypatch.setenv("GPU_WINDOW_S", "1.0")
    waiting, timing = run_probes(registry=[grouped("waiting", "waits_for_mark", "g", timeout_s=90.0),
                                           grouped("timing", "gpu_window", None, exclusive=True)])
    assert waiting.status == timing.status == "ok", (waiting.summary, timing.summary)
    assert waiting.measured["saw_mark"] is True
    assert waiting.measured["on_gpu"] >= timing.measured["ended"]


def test_waiting_for_the_gpu_does_not_count_against_a_probes_timeout(monkeypatch):
    import threading

    from probes.context import ProbeContext
    from qwendoctor.doctor import _GpuGate, _GroupWorker

    monkeypatch.setenv("GPU_WINDOW_S", "0.1")
    gate = _GpuGate()
    gate.acquire(exclusive=True)  # a timing probe holds the GPU for 2.5 s, longer than the 1.5 s timeout
    released = []

    def release_later():
        time.sleep(2.5)
        released.append(time.time())
        gate.release(exclusive=True)

    threading.Thread(target=release_later).start()
    found, rest = _GroupWorker([grouped("p", "gpu_window", "g", timeout_s=1.5)], ProbeContext(), gate).collect()
    assert rest == [] and found["p"].status == "ok", found["p"].summary
    assert found["p"].measured["started"] >= released[0]
    gate.acquire(exclusive=True)  # the worker handed the GPU back
    gate.release(exclusive=True)


@pytest.mark.parametrize("timing_module, summary", [("abort", "killed by SIGABRT"), ("hang", "timed out after 1 s")])
def test_a_timing_probe_that_dies_or_hangs_frees_the_gpu(monkeypatch, timing_module, summary):
    monkeypatch.setenv("GPU_WINDOW_S", "0.1")
    bad, second, shared = run_probes(registry=[
        grouped("bad", timing_module, None, timeout_s=1.0, exclusive=True),
        grouped("second", "gpu_window", None, exclusive=True), grouped("shared", "gpu_window", "g")])
    assert bad.status == "crash" and bad.summary == summary
    assert second.status == "ok" and shared.status == "ok"
    assert _disjoint(second, shared)




def test_the_gpu_gate_lets_a_waiting_timing_probe_go_before_later_askers():
    import threading

    from qwendoctor.doctor import _GpuGate

    gate, order = _GpuGate(), []
    gate.acquire(exclusive=False)  # a probe already on the GPU

    def take(name, exclusive):
        gate.acquire(exclusive)
        order.append(name)
        time.sleep(0.1)
        gate.release(exclusive)

    timing = threading.Thread(target=take, args=("timing", True))
    timing.start()
    while not gate._exclusive_waiting:
        time.sleep(0.01)
    later = threading.Thread(target=take, args=("later", False))
    later.start()
    time.sleep(0.2)
    assert order == []  # the timing probe waits for the probe on the GPU, the later one waits behind it
    gate.release(exclusive=False)
    timing.join(5)
    later.join(5)
    assert order == ["timing", "later"]


def test_the_trace_lines_up_runner_events_and_the_workers_phases(tmp_path, monkeypatch):
    import json

    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("QWENDOCTOR_CHECK_TRACE", str(trace))
    monkeypatch.setenv("QWENDOCTOR_CHECK_T0", "0")  # the runner sets its own; undone after the test
    [finding] = run_probes(registry=[grouped("marks", "marks", "g")])
    assert finding.status == "ok"
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    events = [line["event"] for line in lines]
    assert events[0] == "worker" and events[-1] == "finding"
    by_event = {line["event"]: line for line in lines}
    pid = finding.measured["pid"]
    for event in ("worker_up", "probe_start", "fake.phase"):
        assert by_event[event]["pid"] == pid
    assert by_event["fake.phase"]["detail"] == "inside"
    # One clock: the worker's marks fall between the runner starting it and reading its finding.
    times = [by_event[e]["t"] for e in ("worker", "worker_up", "probe_start", "fake.phase", "finding")]
    assert times == sorted(times) and times[0] >= 0


def test_without_a_trace_file_a_mark_writes_nothing(tmp_path, monkeypatch):
    from probes.context import mark

    monkeypatch.delenv("QWENDOCTOR_CHECK_TRACE", raising=False)
    monkeypatch.chdir(tmp_path)
    mark("nothing")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("gpu, model, size", [(False, "tiny", 128), (True, "Qwen/Qwen-Image", 1328)])
def test_check_sizes_its_probes_for_what_this_machine_runs(monkeypatch, gpu, model, size):
    """Without a GPU, tune and generate run tiny: check looks at that, not at a 57 GB model it cannot run."""
    seen = {}

    def fake_run_probes(ids=None, ctx=None, on_finding=None):
        seen["ctx"] = ctx
        return []

    monkeypatch.setattr(doctor, "_has_nvidia_gpu", lambda: gpu)
    monkeypatch.setattr(doctor, "run_probes", fake_run_probes)
    result = CliRunner().invoke(check, ["--json"])
    assert result.exit_code == 0, result.output
    ctx = seen["ctx"]
    assert (ctx.model, ctx.workload.model, ctx.workload.width, ctx.workload.height) == (model, model, size, size)
    CliRunner().invoke(check, ["--json", "--model", "synthetic", "--width", "1024"])
    assert (seen["ctx"].model, seen["ctx"].workload.width, seen["ctx"].workload.height) == ("synthetic", 1024, 1328)


def test_findings_are_announced_as_they_arrive(monkeypatch):
    """The check's progress line hears of each finding when it lands, from whichever thread ran it; the report
    keeps the registry's order whatever the arrival order."""
    arrived = []
    registry = [spec("slow", "slow"), spec("good", "good"), spec("boom", "raises", native=True)]
    findings = run_probes(registry=registry, on_finding=lambda finding: arrived.append(finding.id))
    assert sorted(arrived) == ["boom", "good", "slow"] and arrived[-1] == "slow"  # the slow one lands last
    assert [f.id for f in findings] == ["slow", "good", "boom"]
    assert doctor.selected_probes(None, PROBES, bench=False) == [p for p in PROBES if p.tier == "quick"]
    assert doctor.selected_probes(["roofline"], PROBES, bench=False) == [p for p in PROBES if p.id == "roofline"]
