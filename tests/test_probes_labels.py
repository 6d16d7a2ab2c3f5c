"""Every figure a finding states comes from this machine or is labelled with the card it was measured on.

The whole probe set runs in-process against a fake machine whose GPU probes/measured.toml has no figures for,
with its CUDA work done on the CPU (tests.fakes.CudaOnCpuTorch, FakeNvml) and the slow measurements stubbed.
Each figure (a number with %, x, ms, s, TFLOP/s, GB/s or TB/s) in a summary, a fix or a detail line must sit in
a clause that says where it comes from: measured "here" or "on this machine", "measured on" or "on" a named card,
or a datasheet or a limit of our own. A label carries over to the clauses after it in the same line, until a
"not measured on" clause drops it: "FA4's gain was not measured on NVIDIA H200; it makes a step ~3% faster" fails.
"""

from __future__ import annotations

import json
import re
import subprocess
from types import SimpleNamespace

import pytest

from probes import PROBES, attention_truth, load_probe, memory_plan, qwen_shapes, roofline
from probes.context import ProbeContext
from probes.finding import Finding
from probes.workload import Workload
from tests.fakes import CudaOnCpuTorch, FakeMetadata, FakeNvml, fake_import

MIB = 1024**2
UNMEASURED = ["NVIDIA H200", "NVIDIA RTX 6000 Ada Generation"]  # neither is in probes/measured.toml

FIGURE = re.compile(r"(?<![\w.^/-])~?\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?(?:%|x(?!\w)|\s?(?:ms|s|TFLOP/s|GB/s|TB/s)(?!\w))")
CARD = r"\b(?:NVIDIA|H100|H200|A100|L40S|B200|RTX|GH200)\b"
LABEL = re.compile(rf"\bhere\b|\bthis machine\b|\bthis GPU\b|\bmeasured on\b|{CARD}|\bdatasheet\b|\blimit\b")
UNLABEL = re.compile(r"\bnot measured\b")
CLAUSES = re.compile(r";\s+|\.\s+(?=[A-Z])")


def unlabelled(text: str) -> list[str]:
    """The figures in `text` whose clause, or a clause before it, does not say where they come from."""
    bad, labelled = [], False
    for clause in CLAUSES.split(text or ""):
        if UNLABEL.search(clause):
            labelled = False
        elif LABEL.search(clause):
            labelled = True
        if not labelled:
            bad += [f"{figure.group(0)!r} in {clause!r}" for figure in FIGURE.finditer(clause)]
    return bad


def unlabelled_in(finding: Finding) -> list[str]:
    return [f"{finding.id}: {bad}" for text in [finding.summary, finding.fix, *finding.details]
            for bad in unlabelled(text)]


def test_the_check_catches_another_cards_figure_stated_as_this_machines():
    assert unlabelled("FA4's gain was not measured on NVIDIA H200; FA4 makes a step ~3% faster") == [
        "'~3%' in 'FA4 makes a step ~3% faster'"]
    assert unlabelled("compiled 1.61x faster than bf16, 404.6 vs 650.6 ms/step")
    assert unlabelled("attention is 40% of a step; FP8 needs 1.6-20.9 s of warm-up")
    assert unlabelled("roofline: 790 TFLOP/s, copy 3.03 TB/s (2900 GB/s)")
    assert unlabelled("not measured on NVIDIA H200; on NVIDIA H100 80GB HBM3 (x.json): a step took 2.6% less; "
                      "FP8 is 1.61x faster") == []  # the card's label carries to the clause after it
    assert unlabelled("S=7017, timed here: native 620 TFLOP/s, 141 ms/step; best other: cudnn 570 TFLOP/s") == []
    assert unlabelled("fp32 matmul 4096x4096x4096 on 1x NVIDIA H200, 256^3, S=7017, 71 GiB, cc 9.0") == []


@pytest.fixture
def fast_measurements(monkeypatch):
    """The probes' GPU work, at toy sizes or stubbed: only their texts are under test."""
    from probes import bytecode, compile as compile_probe, fp8, tf32

    monkeypatch.setattr(qwen_shapes, "MLP", 256)
    monkeypatch.setattr(qwen_shapes, "HIDDEN", 256)
    monkeypatch.setattr(attention_truth, "SETTLE_S", 0.01)
    monkeypatch.setattr(attention_truth, "REPS", 5)
    monkeypatch.setattr(attention_truth, "WARMUP", 1)
    monkeypatch.setattr(roofline, "N", 128)
    monkeypatch.setattr(roofline, "COPY_BYTES", MIB)
    monkeypatch.setattr(roofline, "SETTLE_GEMMS", 2)
    monkeypatch.setattr(tf32, "matmul_tflops", lambda torch, on: 380.0 if on else 51.0)
    monkeypatch.setattr(fp8, "scaled_mm_rel_err", lambda torch, device: 0.04)
    monkeypatch.setattr(compile_probe, "tiny_compile", lambda torch, device: (1.3, 0.0))
    monkeypatch.setattr(bytecode, "COMPILE_BUDGET_S", 0.01)


def fake_machine(gpu: str, tmp_path, cc=(9, 0), memory_mib=143771, packages=None) -> ProbeContext:
    """`gpu` as torch and NVML see it; nvidia-smi, the import child and the packages faked."""

    def run(argv, timeout):
        if argv[:1] == ["nvidia-smi"]:
            return subprocess.CompletedProcess(argv, 0, "Driver Version: 580.1  CUDA Version: 13.0\n", "")
        if any(str(arg).endswith("_import_child.py") for arg in argv):
            keys = [arg.split("=")[0] for arg in argv[4:]]
            return subprocess.CompletedProcess(argv, 0, "\n".join(
                json.dumps({"key": key, "ok": True, "seconds": 0.5}) for key in keys), "")
        return subprocess.CompletedProcess(argv, 0, "", "")  # `python -c "import flash_attn..."`: imports

    modules = {"torch": CudaOnCpuTorch(name=gpu, cc=cc), "triton": SimpleNamespace(__version__="3.5.1"),
               "torchao": SimpleNamespace(__version__="0.18.0"),
               "torchao.quantization": SimpleNamespace(Float8DynamicActivationFloat8WeightConfig=object),
               "torch.nn.attention.flex_attention": ImportError("no flex on the CPU"),
               # The compile probe's imports of inductor (seconds), which its stubbed compile does not need.
               "torch._inductor.config": SimpleNamespace(), "torch._inductor.compile_fx": SimpleNamespace(),
               "torch._dynamo.utils": SimpleNamespace(counters={"inductor": {}}), **(packages or {})}
    return ProbeContext(import_module=fake_import(**{k.replace(".", "__"): v for k, v in modules.items()}),
                        nvml=FakeNvml(name=gpu, total=memory_mib * MIB, cc=cc), run=run,
                        env={"HOME": str(tmp_path)}, disk_paths={"hf_cache": tmp_path / "hub"},
                        workload=Workload(width=64, height=64), text_tokens=8, bench=True)


def attention_backends_ctx() -> ProbeContext:
    """attention_backends moves real tensors to the device: on the CPU, with a dispatcher that runs SDPA."""
    import torch

    def dispatch_attention_fn(q, k, v, backend=None):
        return torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    return ProbeContext(import_module=fake_import(
        diffusers__models__attention_dispatch=SimpleNamespace(dispatch_attention_fn=dispatch_attention_fn)))


@pytest.mark.parametrize("gpu", UNMEASURED)
def test_no_probe_states_another_cards_figure_as_this_machines(gpu, tmp_path, fast_measurements):
    ctx = fake_machine(gpu, tmp_path, cc=(8, 9) if "Ada" in gpu else (9, 0),
                       memory_mib=49140 if "Ada" in gpu else 143771)
    findings = [load_probe(spec.module)(attention_backends_ctx() if spec.id == "attention_backends" else ctx)
                for spec in PROBES]
    assert [f.status for f in findings if f.status == "crash"] == []
    # The probes whose texts quote another card's figures did run their GPU paths.
    by_id = {f.id: f for f in findings}
    assert by_id["fp8"].status == "ok" and by_id["attention_truth"].status in ("ok", "warn")
    assert by_id["flash_attn"].status == "ok" and by_id["roofline"].measured["gpu"] == gpu
    assert any("on NVIDIA H100 80GB HBM3" in d for d in by_id["fp8"].details + by_id["flash_attn"].details)
    assert [bad for f in findings for bad in unlabelled_in(f)] == []


@pytest.mark.parametrize("gpu", UNMEASURED)
def test_the_other_verdicts_label_their_figures_too(gpu, tmp_path, fast_measurements, monkeypatch):
    """The warn and fail texts the fake machine above does not reach."""
    from probes import flash_attn, imports

    findings = [
        # Another backend is faster here.
        attention_truth.summarize({"B": 1, "H": 24, "S": 7017, "D": 128}, {"native": 2.0, "cudnn": 1.5, "fa4": 1.2},
                                  {}, "flash", "pytorch_flash::flash_fwd_kernel", 1.0, {"cudnn": 1e-3, "fa4": 2e-3}),
        attention_truth.summarize({"B": 1, "H": 24, "S": 7017, "D": 128}, {"native": 2.0}, {"cudnn": "x"}, "cudnn",
                                  "", None),
        # Capped, throttled, slow, a PCIe card.
        roofline.summarize(gpu, 300.0, 600.0, 1500.0, {"index": 0, "power_limit_w": 400.0,
                                                       "default_power_limit_w": 700.0, "throttle_mask": 0x40},
                           bf16_sustained_tflops=280.0),
        roofline.summarize(f"{gpu} PCIe", 700.0, None, 3000.0, None),
        memory_plan.summarize(gpu, 47.0, 2.0, Workload(width=1328, height=1328)),
        memory_plan.summarize(gpu, 20.0, None, Workload(width=1328, height=1328)),
    ]
    # FA4 installed and working: the FA4 figures sit in the details beside this machine's check.
    fa4 = fake_machine(gpu, tmp_path, packages={
        "importlib.metadata": FakeMetadata({"flash-attn-4": ("4.0.0b36", [], ["flash_attn"])}),
        "importlib.util": SimpleNamespace(find_spec=lambda name: None),
        "flash_attn.cute": SimpleNamespace(flash_attn_func=lambda q, k, v: q)})
    monkeypatch.setattr(flash_attn, "rel_err", lambda torch, fn, device, dtype: 3e-3)
    findings.append(flash_attn.probe(fa4))
    assert findings[-1].summary == "FA4 4.0.0b36 imports; numbers match", findings[-1]
    # An import that hangs.

    def hangs(argv, timeout):
        return subprocess.CompletedProcess(argv, 1, json.dumps({"start": "torch"}),
                                           'Timeout (0:01:00)!\n  File "/site/torch/__init__.py", line 9 in <module>\n')

    findings.append(imports.probe(ProbeContext(run=hangs, nvml=FakeNvml(name=gpu))))
    assert findings[0].status == "warn" and findings[-1].measured["packages"]["torch"]["state"] == "hangs"
    assert [bad for f in findings for bad in unlabelled_in(f)] == []
