"""The doctor's probes on a real GPU: each runs, and says what an H100 with torch 2.11 should say."""

import pytest

from probes.context import ProbeContext
from qwendoctor.doctor import exit_code, run_probes


@pytest.fixture(scope="module")
def findings():
    return {f.id: f for f in run_probes(ctx=ProbeContext(bench=True))}


def test_no_probe_crashes(findings):
    crashed = {k: f.summary for k, f in findings.items() if f.status == "crash"}
    assert not crashed
    assert exit_code(list(findings.values())) in (0, 1)


def test_gpu_facts(findings):
    gpu = findings["gpu"].measured["gpus"][0]
    assert gpu["cc"] >= "8.0" and gpu["memory_gib"] > 20 and gpu.get("sm_count", 1) > 0


def test_attention_truth_measures_real_backends(findings):
    truth = findings["attention_truth"]
    assert truth.status in ("ok", "warn"), truth.summary
    tflops = truth.measured["tflops"]
    assert tflops and all(value > 0 for value in tflops.values())
    assert truth.measured["native_picks"] != "unknown", truth.details
    assert 0 < truth.measured["attention_share"] < 1


def test_fp8_compile_and_tf32_on_the_gpu(findings):
    assert findings["fp8"].status in ("ok", "warn"), findings["fp8"].summary
    assert findings["compile"].status == "ok", findings["compile"].summary
    assert findings["tf32"].status == "ok", findings["tf32"].summary


def test_roofline_measures_the_card(findings):
    roofline = findings["roofline"]
    assert roofline.status in ("ok", "warn"), roofline.summary
    assert roofline.measured["bf16_tflops"] > 100 and roofline.measured["copy_gbps"] > 100


def test_memory_plan_decides(findings):
    plan = findings["memory_plan"]
    assert plan.status in ("ok", "warn", "fail") and plan.measured["plans"]
