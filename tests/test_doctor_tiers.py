"""The bench tier, the workload settings reaching probe subprocesses, and check's own options."""

import dataclasses

from click.testing import CliRunner

from probes import ProbeSpec
from probes.context import ProbeContext
from probes.workload import Workload
from qwendoctor.doctor import ATTENTION_REGISTRARS, check, run_probes
from qwendoctor.errors import UsageError

QUICK = ProbeSpec("quick", "tests.fake_probes.good", False, 30.0, "fake quick")
BENCH = ProbeSpec("bench", "tests.fake_probes.good", False, 30.0, "fake bench", tier="bench")


def test_bench_tier_runs_only_with_bench_or_when_named():
    registry = [QUICK, BENCH]
    assert [f.id for f in run_probes(registry=registry)] == ["quick"]
    assert [f.id for f in run_probes(registry=registry, ctx=ProbeContext(bench=True))] == ["quick", "bench"]
    assert [f.id for f in run_probes(["bench"], registry=registry)] == ["bench"]


def test_workload_settings_reach_a_probe_subprocess():
    echo = ProbeSpec("settings_echo", "tests.fake_probes.settings_echo", True, 60.0, "echo")
    ctx = ProbeContext(workload=Workload(width=1024, height=768), model="/models/qwen", bench=True)
    [finding] = run_probes(registry=[echo], ctx=ctx)
    assert finding.status == "ok" and finding.summary == "1024x768"
    assert finding.measured["settings"] == {"width": 1024, "height": 768, "text_tokens": 128,
                                            "model": "/models/qwen", "bench": True,
                                            "attention_registrars": ATTENTION_REGISTRARS}


def test_settings_round_trip():
    ctx = ProbeContext(workload=Workload(model="x", width=512, height=1328), text_tokens=77, model="x", bench=True)
    back = ProbeContext.from_settings(ctx.settings())
    assert dataclasses.asdict(back.workload) == dataclasses.asdict(ctx.workload)
    assert (back.text_tokens, back.model, back.bench) == (77, "x", True)


def test_check_refuses_a_width_not_divisible_by_16():
    result = CliRunner().invoke(check, ["--width", "1000", "--only", "system"])
    assert isinstance(result.exception, UsageError) and result.exception.exit_code == 2
    assert "--width must be a positive multiple of 16, got 1000" in str(result.exception)


def test_list_marks_the_bench_tier():
    result = CliRunner().invoke(check, ["--list"])
    assert result.exit_code == 0
    assert any(line.startswith("roofline") and line.endswith("[--bench]") for line in result.output.splitlines())


def test_exclusive_probes_run_alone_after_the_others(tmp_path, monkeypatch):
    """A timing probe must not share the GPU: it starts only after every concurrent probe has finished."""
    import time

    from qwendoctor import doctor

    spans = {}
    real = doctor._run_in_process

    def recording(spec, ctx):
        start = time.perf_counter()
        result = real(spec, ctx)
        time.sleep(0.2)
        spans[spec.id] = (start, time.perf_counter())
        return result

    monkeypatch.setattr(doctor, "_run_in_process", recording)
    timing = ProbeSpec("timing", "tests.fake_probes.good", False, 30.0, "times the GPU", exclusive=True)
    others = [ProbeSpec(f"p{i}", "tests.fake_probes.good", False, 30.0, "other") for i in range(3)]
    findings = run_probes(registry=[others[0], timing, *others[1:]], jobs=4)
    assert [f.id for f in findings] == ["p0", "timing", "p1", "p2"]
    assert spans["timing"][0] >= max(end for probe_id, (_, end) in spans.items() if probe_id != "timing")
