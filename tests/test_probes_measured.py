"""probes/ on its own: the measured-figures file and its loader, the attention-backend table, the timing module,
the FLOPs model for any transformer config, and the registration of backends diffusers does not ship."""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from probes import attention_backends, backends, measured, qwen_shapes, timing
from probes.context import ProbeContext
from tests.fakes import FakeEvent, fake_import

ROOT = Path(__file__).resolve().parent.parent
H100 = "NVIDIA H100 80GB HBM3"
RULES = ("max-autotune", "coordinate-descent", "eager-fp8", "complex-rope")


def entries(table, prefix=""):
    """(dotted key, entry) for every entry (a table with value or values) under `table`."""
    for key, node in table.items():
        if isinstance(node, dict):
            if "value" in node or "values" in node:
                yield prefix + key, node
            else:
                yield from entries(node, f"{prefix}{key}.")


def numbers(values):
    if isinstance(values, dict):
        return [n for v in values.values() for n in numbers(v)]
    if isinstance(values, list):
        return [n for v in values for n in numbers(v)]
    return [values]


# --- probes/measured.toml --------------------------------------------------------------------------------

def test_the_data_file_loads_and_every_source_exists():
    data = measured.load()
    assert H100 in data
    unsourced = []
    for gpu, table in data.items():
        for key, entry in entries(table):
            assert entry.get("what") and "unit" in entry, (gpu, key)
            if "source" in entry:
                source = entry["source"]
                assert source.startswith("benchmarks/") and (ROOT / source).is_file(), (gpu, key, source)
                assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", entry["date"]), (gpu, key)
            else:
                assert entry.get("unsourced"), f"{gpu} {key}: neither a source nor why it has none"
                unsourced.append(key)
    # Every figure has a committed source (the last one without, the memory calibration's, went with issue 17):
    # a new figure without one fails here.
    assert unsourced == []


def test_every_sourced_figure_is_in_its_source():
    """Each number (to its last digit) appears in the file the entry names, so a source that moves or is
    rewritten without the figure fails here."""
    for gpu, table in measured.load().items():
        for key, entry in entries(table):
            if "source" not in entry:
                continue
            found = [float(x) for x in re.findall(r"\d+\.?\d*", (ROOT / entry["source"]).read_text())]
            extra = [entry["warmup_s"]] if "warmup_s" in entry else []
            for number in numbers(entry.get("values", entry.get("value"))) + numbers(extra):
                assert any(abs(f - number) <= 0.05 for f in found), (gpu, key, number, entry["source"])


def test_the_data_file_ships_with_the_package():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "measured.toml" in pyproject["tool"]["setuptools"]["package-data"]["probes"]


def test_each_dominated_rule_quotes_its_own_figures():
    dominated = measured.for_gpu(H100)["dominated"]
    assert set(dominated) == set(RULES)  # "full" compile and TF32 under bf16 are reasoning, not measurement
    for rule, entry in dominated.items():
        for number in numbers(entry["values"]):
            assert f"{number:g}" in entry["why"] or f"{number:.1f}" in entry["why"], (rule, number)


def test_gpu_names_match_exactly_after_normalising_whitespace_and_case():
    assert measured.for_gpu("  nvidia  H100 80gb HBM3 ")["roofline"]["source"] == "benchmarks/check/check_h100.json"
    assert measured.for_gpu("NVIDIA H100 PCIe") == {}  # another card, even of the same family
    assert measured.for_gpu("NVIDIA H200") == {} and measured.for_gpu(None) == {}
    assert measured.figure(H100, "dominated.eager-fp8")["values"] == [1793.7, 637.3]
    assert measured.figure("NVIDIA H200", "dominated.eager-fp8") is None
    assert measured.figure(H100, "dominated") is None  # a group, not an entry


def test_evidence_on_the_measured_card_only():
    for rule in RULES:
        found = measured.evidence(H100, rule)
        assert found.rule == rule and found.gpu == H100 and (ROOT / found.source).is_file()
        assert found.sentence().endswith(f"(measured on {H100}, {found.source})")
    assert "395.1 against 404.6" in measured.evidence(H100, "coordinate-descent").why
    assert measured.evidence("NVIDIA H200", "max-autotune") is None
    assert measured.evidence(None, "max-autotune") is None
    assert measured.evidence(H100, "full") is None and measured.evidence(H100, "tf32") is None


def test_describe_labels_the_card_and_the_source():
    assert measured.describe(H100, "fa4_w1_step") == (
        f"measured on {H100}: W1 step, eager, fa4 attention vs the default (native) attention: "
        "633.6 vs 650.4 ms/step (benchmarks/fa4/fa4_h100.json)")
    other = measured.describe("NVIDIA H200", "fa4_w1_step")
    assert other.startswith(f"not measured on NVIDIA H200; measured on {H100}: ") and "fa4_h100.json" in other
    assert measured.describe(None, "fa4_w1_step").startswith("not measured on this machine (no GPU); measured on")
    assert measured.describe(H100, "no_such_figure") == (
        "no_such_figure: not measured on NVIDIA H100 80GB HBM3 nor on any GPU in probes/measured.toml")



def test_a_figure_without_a_committed_source_says_so(monkeypatch):
    monkeypatch.setattr(measured, "load", lambda: {H100: {"peaks": {
        "values": [1.0, 2.0], "unit": "GiB", "what": "two peaks", "unsourced": "quoted from a talk"}}})
    assert "no committed source" in measured.describe(H100, "peaks")


def test_nearest_prefers_this_card_and_labels_another():
    here = measured.nearest(H100, "roofline")
    assert here.here and here.where() == f"measured on {H100} (benchmarks/check/check_h100.json)"
    there = measured.nearest("NVIDIA H100 PCIe", "roofline")
    assert not there.here and there.where().startswith(f"not measured on NVIDIA H100 PCIe; on {H100} (")


# --- probes/backends.py ----------------------------------------------------------------------------------

def test_backend_table_derives_the_tuples_qwendoctor_uses():
    assert backends.ATTENTION_BACKENDS == ("native", "_native_cudnn", "_native_flash", "_native_efficient",
                                           "_native_math", "flash", "_flash_3", "fa4", "sageattn", "flex")
    assert backends.CUDA_ONLY_BACKENDS == ("_native_cudnn", "_native_efficient", "flash", "_flash_3", "fa4",
                                           "sageattn")
    assert backends.ULYSSES_BACKENDS == ("native", "_native_cudnn", "_native_flash", "flash")
    assert backends.RING_BACKENDS == ("_native_cudnn", "_native_flash", "flash")
    assert set(backends.RING_BACKENDS) <= set(backends.ULYSSES_BACKENDS)
    assert backends.BACKEND_BY_KERNEL == {"native": "native", "cudnn": "_native_cudnn", "flash": "_native_flash",
                                          "efficient": "_native_efficient", "flex": "flex", "fa2": "flash",
                                          "fa3": "_flash_3", "fa4": "fa4", "sage": "sageattn"}
    assert backends.BACKEND_BY_NATIVE_PICK == {"cudnn": "_native_cudnn", "flash": "_native_flash",
                                               "efficient": "_native_efficient", "math": "_native_math"}
    assert backends.REFERENCE_ONLY_BACKENDS == ("_native_math",)
    assert {b.package for b in backends.BACKENDS if b.package} == {"flash-attn", "flash-attn-3", "flash-attn-4",
                                                                   "sageattention"}
    # Every package backend says how to install it, for the one-line refusal; only 8-bit attention is lossy.
    assert all(b.install for b in backends.BACKENDS if b.package)
    assert [b.name for b in backends.BACKENDS if b.lossy] == ["sageattn"]


def test_the_probes_use_the_table():
    from probes import attention_truth

    assert attention_backends.CANDIDATES == list(backends.ATTENTION_BACKENDS)
    assert attention_truth.SDPA_KERNELS == ("cudnn", "flash", "efficient", "math")
    f = attention_truth.summarize({"B": 1, "H": 24, "S": 7017, "D": 128}, {"native": 2.0, "fa2": 1.0}, {}, "flash",
                                  "", None, errors={"fa2": 1e-3})
    assert 'set_attention_backend("flash")' in f.fix and "flash-attn package (FA2)" in f.fix


def test_registrars_register_backends_diffusers_does_not_ship():
    calls = []
    ours = SimpleNamespace(register=lambda: calls.append("register") or True, missing=lambda: False)
    ctx = ProbeContext(import_module=fake_import(ours=ours), attention_registrars={"fa4": "ours:register"})
    assert attention_backends.register_backends(ctx) == {} and calls == ["register"]

    ctx = ProbeContext(import_module=fake_import(ours=ours), attention_registrars={"fa4": "ours:missing"})
    assert attention_backends.register_backends(ctx) == {
        "fa4": "not installed or does not import (flash-attn-4): see the flash_attn probe"}

    ctx = ProbeContext(import_module=fake_import(ours=ImportError("No module named 'ours'")),
                       attention_registrars={"fa4": "ours:register"})
    assert attention_backends.register_backends(ctx)["fa4"].startswith("could not be registered: ImportError")
    assert attention_backends.register_backends(ProbeContext()) == {}  # probes alone register nothing


def test_settings_carry_text_tokens_and_registrars():
    ctx = ProbeContext(text_tokens=77, attention_registrars={"fa4": "m:f"}, model="x")
    back = ProbeContext.from_settings(ctx.settings())
    assert (back.text_tokens, dict(back.attention_registrars), back.workload.model) == (77, {"fa4": "m:f"}, "x")


# --- probes/timing.py ------------------------------------------------------------------------------------

def test_kernel_timing_with_a_fake_cuda():
    flushes = []
    flush = SimpleNamespace(zero_=lambda: flushes.append(1))
    torch = SimpleNamespace(cuda=SimpleNamespace(Event=FakeEvent, synchronize=lambda: None),
                            empty=lambda *a, **k: flush, uint8="u8")
    samples = timing.event_samples(torch, lambda: time.sleep(0.001), 3, flush)
    assert len(samples) == 3 and all(s >= 1.0 for s in samples) and len(flushes) == 3
    assert timing.time_ms(torch, lambda: time.sleep(0.001), warmup=1, reps=3, flush_l2=True) >= 1.0


def test_host_clock_statistics():
    assert timing.median([3.0, 1.0, 2.0]) == 2.0
    assert timing.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and timing.percentile([5.0], 90) == 5.0
    assert timing.peak_memory_gib("cpu") is None


# --- probes/qwen_shapes.py -------------------------------------------------------------------------------

def test_flops_for_any_transformer_config():
    config = {"num_layers": 2, "num_attention_heads": 4, "attention_head_dim": 8}  # hidden 32, MLP 128
    flops = qwen_shapes.flops_per_step_from_config(config, 64, 64, 4, passes=2)
    tokens = 4 * 4 + 4
    assert flops["linear"] == 2 * 2.0 * 2 * (4 * 32**2 + 2 * 32 * 128) * tokens
    assert flops["attention"] == 2 * 2 * 4.0 * tokens**2 * 4 * 8
    assert flops["total"] == flops["linear"] + flops["attention"]
    ours = qwen_shapes.flops_per_step_from_config(qwen_shapes.QWEN_IMAGE_TRANSFORMER, 1328, 1328, 128, passes=2)
    assert ours == qwen_shapes.flops_per_step(1328, 1328, 128)
    assert ours["total"] / 1e12 == pytest.approx(263.3, abs=0.1)  # benchmarks/bench: "FLOPs per step: 263.3 T"
