"""The measuring probes (attention_truth, model, memory_plan, roofline) and their cost model, with fakes.

The pure parts get H100 numbers like benchmarks/check/check_h100.json's; the CUDA paths run end to end on the CPU
through a torch whose `cuda` namespace is faked (events timed with perf_counter, device= dropped), at toy sizes.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest

from probes import attention_truth, memory_plan, model, qwen_shapes, roofline
from probes.context import ProbeContext
from probes.finding import Finding
from probes.workload import Workload
from tests.fakes import CudaOnCpuTorch, FakeNvml

GIB = 1024**3
MIB = 1024**2
W1 = {"B": 1, "H": 24, "S": 7017, "D": 128}


def no_cuda_torch():
    return SimpleNamespace(__version__="2.13.0+cpu", version=SimpleNamespace(cuda=None),
                           cuda=SimpleNamespace(is_available=lambda: False))


def importer(**table):
    def import_module(name):
        value = table.get(name)
        if value is None:
            raise ImportError(f"No module named {name!r}")
        if isinstance(value, BaseException):
            raise value
        return value
    return import_module


def no_nvml():
    raise OSError("NVML Shared Library Not Found")


# --- qwen_shapes ---------------------------------------------------------------------------------------

def test_qwen_shapes_match_reference():
    assert qwen_shapes.image_tokens(1328, 1328) == 6889
    assert qwen_shapes.seq_len(1328, 1328, 128) == 7017
    per_pass = qwen_shapes.flops_per_pass(1328, 1328, 128)
    assert per_pass["linear"] / 1e12 == pytest.approx(95, abs=1)
    assert per_pass["attention"] / 1e12 == pytest.approx(36, abs=1)
    assert qwen_shapes.flops_per_step(1328, 1328, 128)["total"] / 1e12 == pytest.approx(263, abs=1)
    assert qwen_shapes.transformer_bytes() / GIB == pytest.approx(38.05, abs=0.01)
    assert qwen_shapes.transformer_bytes(fp8=True) / GIB == pytest.approx(19.07, abs=0.05)


# --- attention_truth -----------------------------------------------------------------------------------

CUDNN_KERNEL = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0"
FLASH_KERNEL = ("void pytorch_flash::flash_fwd_kernel<pytorch_flash::Flash_fwd_kernel_traits<128, 128, 64, 4, "
                "false, false, cutlass::bfloat16_t>, false, false, false, false, true, true, false>"
                "(pytorch_flash::Flash_fwd_params)")
EFF_KERNEL = ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::"
              "bfloat16_t, cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)")


def test_kernel_classifier_on_real_names():
    c = attention_truth.classify_kernel
    assert c(CUDNN_KERNEL) == "cudnn"  # contains "flash" too: cuDNN wins
    assert c(FLASH_KERNEL) == "flash"
    assert c(EFF_KERNEL) == "efficient"
    assert c("void at::native::vectorized_elementwise_kernel<4, ...>") is None
    assert attention_truth.classify_kernels(["void at::native::elementwise", CUDNN_KERNEL]) == ("cudnn", CUDNN_KERNEL)
    # No recognisable kernel: the aten op decides.
    assert attention_truth.classify_kernels(["sm90_xmma_gemm_bf16"], ["aten::scaled_dot_product_attention",
                                            "aten::_scaled_dot_product_efficient_attention"])[0] == "efficient"
    assert attention_truth.classify_kernels([], [])[0] == "unknown"


def ms_at(tflops: float, s: int = 7017) -> float:
    return 4 * s * s * 24 * 128 / (tflops * 1e12) * 1e3


def gemm_ms_at(tflops: float, s: int = 7017) -> float:
    return 2 * s * 3072 * 12288 / (tflops * 1e12) * 1e3


def test_native_on_cudnn_is_ok():
    ms = {"native": ms_at(620), "cudnn": ms_at(615), "flash": ms_at(360), "efficient": ms_at(177)}
    f = attention_truth.summarize(W1, ms, {"fa3": "not importable"}, "cudnn", CUDNN_KERNEL, gemm_ms_at(750))
    assert f.status == "ok" and f.fix is None
    m = f.measured
    assert m["native_picks"] == "cudnn" and m["best"] == "native" and m["native_kernel"] == CUDNN_KERNEL
    assert m["tflops"]["native"] == pytest.approx(620, abs=0.5)
    assert m["attention_ms_per_step"] == pytest.approx(120 * ms_at(620), abs=0.1)  # ~117 ms
    assert m["linear_ms_per_step"] == pytest.approx(2 * 95.36e12 / 750e12 * 1e3, abs=0.5)  # ~254 ms
    assert 0.28 < m["attention_share"] < 0.36
    assert m["gemm_tflops"] == pytest.approx(750, abs=0.5) and m["gain_ms_per_step"] == 0
    assert any("not counted" in d for d in f.details) and any(CUDNN_KERNEL in d for d in f.details)
    assert set(m) >= {"shape", "tflops", "ms", "native_kernel", "native_picks", "best", "attention_ms_per_step",
                      "linear_ms_per_step", "attention_share", "gain_ms_per_step", "gemm_tflops"}


def test_native_on_flash_warns_with_gain():
    ms = {"native": ms_at(360), "cudnn": ms_at(600), "flash": ms_at(360), "efficient": ms_at(177)}
    f = attention_truth.summarize(W1, ms, {}, "flash", FLASH_KERNEL, gemm_ms_at(790))
    assert f.status == "warn" and f.measured["best"] == "cudnn"
    gain = 120 * (ms_at(360) - ms_at(600))
    assert f.measured["gain_ms_per_step"] == pytest.approx(gain, abs=0.1)  # ~80 ms per step
    assert '"_native_cudnn"' in f.fix and "tune" in f.fix
    assert f"{gain:.0f} ms/step" in f.summary


def test_fast_but_wrong_backend_is_not_recommended_and_fa_package_named():
    ms = {"native": ms_at(360), "fa3": ms_at(700), "fa4": ms_at(650)}
    f = attention_truth.summarize(W1, ms, {}, "flash", FLASH_KERNEL, None, errors={"fa3": 0.5, "fa4": 3e-3})
    assert f.status == "warn" and f.measured["best"] == "fa4" and 'set_attention_backend("fa4")' in f.fix
    assert "install_flash_attention.sh --which fa4" in f.fix
    assert f.measured["attention_share"] is None  # no GEMM timing, no share
    f = attention_truth.summarize(W1, {"cudnn": 1.0}, {"native": "does not run: RuntimeError: x"}, "unknown", "",
                                  None)
    assert f.status == "fail" and f.fix


def test_attention_truth_skips_without_cuda():
    f = attention_truth.probe(ProbeContext(import_module=importer(torch=no_cuda_torch())))
    assert f.status == "skip" and "CUDA" in f.summary


def test_attention_truth_measures_end_to_end_on_fake_cuda(monkeypatch):
    # Keep the GEMM small on two CPU cores, where bf16 matmuls are slow: at Qwen-Image's width the step model's
    # linear part dwarfs attention and its share rounds to 0.
    monkeypatch.setattr(qwen_shapes, "MLP", 256)
    monkeypatch.setattr(qwen_shapes, "HIDDEN", 256)
    ctx = ProbeContext(import_module=importer(torch=CudaOnCpuTorch(),
                                              **{"torch.nn.attention.flex_attention": ImportError("no flex here")}),
                       workload=Workload(width=128, height=128), text_tokens=16, bench=True)
    f = attention_truth.probe(ctx)
    assert isinstance(f, Finding) and f.status in ("ok", "warn"), f
    m = f.measured
    assert m["shape"] == {"B": 1, "H": 24, "S": 80, "D": 128}
    assert "native" in m["ms"] and m["gemm_tflops"] is not None and 0 < m["attention_share"] < 1
    assert "flex" in m["failed"] and "fa2" in m["failed"] and "math" in m["ms"]  # S <= 4096: math is timed
    assert "cudnn" in m["failed"]  # no cuDNN attention on the CPU
    assert m["native_picks"] in ("flash", "math", "unknown")  # the CPU's SDPA: flash_attention_for_cpu


def test_attention_truth_quick_tier_leaves_flex_to_bench(monkeypatch):
    monkeypatch.setattr(qwen_shapes, "MLP", 256)
    ctx = ProbeContext(import_module=importer(torch=CudaOnCpuTorch()),
                       workload=Workload(width=128, height=128), text_tokens=16)
    f = attention_truth.probe(ctx)
    assert "--bench" in f.measured["failed"]["flex"]


# --- model ---------------------------------------------------------------------------------------------

def write_safetensors(path, dtype="BF16", n=8):
    header = json.dumps({"w": {"dtype": dtype, "shape": [n // 2], "data_offsets": [0, n]}}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * n)


def test_model_local_directory(tmp_path):
    root = tmp_path / "qwen"
    root.mkdir()
    (root / "model_index.json").write_text("{}")
    write_safetensors(root / "transformer" / "diffusion_pytorch_model.safetensors", n=4096)
    write_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", dtype="F32", n=64)
    f = model.probe(ProbeContext(model=str(root), env={}))
    assert f.status == "ok", f
    m = f.measured
    assert m["found"] and m["path"] == str(root) and m["dtype"] == "bfloat16" and m["size_gib"] >= 0

    (root / "transformer" / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert model.probe(ProbeContext(model=str(root), env={})).measured["dtype"] == "float16"

    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}}))
    f = model.probe(ProbeContext(model=str(root), env={}))
    assert f.status == "fail" and "incomplete" in f.summary and f.fix


def test_model_missing_path_fails(tmp_path):
    f = model.probe(ProbeContext(model=str(tmp_path / "nope"), env={}))
    assert f.status == "fail" and "does not exist" in f.summary and f.fix
    assert f.measured == {"model": str(tmp_path / "nope"), "found": False, "path": None, "size_gib": None,
                          "dtype": None}


def test_model_missing_hf_id_warns(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    f = model.probe(ProbeContext(env=env))
    assert f.status == "warn" and "hf download Qwen/Qwen-Image" in f.fix and "57 GB" in f.fix
    assert "synthetic" in f.fix and str(tmp_path / "hf" / "hub") in f.details[0]
    assert f.measured["found"] is False


def test_model_hf_cache_hit(tmp_path):
    repo = tmp_path / "hub" / "models--Qwen--Qwen-Image"
    snap = repo / "snapshots" / "abc123"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    write_safetensors(snap / "transformer" / "x.safetensors")
    f = model.probe(ProbeContext(env={"HF_HUB_CACHE": str(tmp_path / "hub")}))
    assert f.status == "ok" and f.measured["path"] == str(snap) and f.measured["found"]
    # Without huggingface_hub the cache layout is read directly.
    f = model.probe(ProbeContext(env={"HF_HUB_CACHE": str(tmp_path / "hub")}, import_module=importer()))
    assert f.status == "ok" and f.measured["path"] == str(snap)


def test_model_builtin_says_where_the_real_model_stands(tmp_path):
    f = model.probe(ProbeContext(model="tiny", env={"HF_HUB_CACHE": str(tmp_path / "hub")}))
    assert f.status == "ok" and f.summary.startswith("built-in 'tiny' model: trained weights shipped")
    assert f.measured["real_model_downloaded"] is False and f.fix is None  # information, not an issue
    assert f.details[0].startswith("Qwen/Qwen-Image is not downloaded; when you want it: hf download Qwen/Qwen-Image")
    repo = tmp_path / "hub" / "models--Qwen--Qwen-Image"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    f = model.probe(ProbeContext(model="synthetic", env={"HF_HUB_CACHE": str(tmp_path / "hub")}))
    assert f.status == "ok" and "random weights made on the GPU" in f.summary
    assert f.measured["real_model_downloaded"] is True and f.details[0].startswith("Qwen/Qwen-Image is in the HF cache")


# --- memory_plan ---------------------------------------------------------------------------------------

def plan(total_mib, width=1328, height=1328):
    ctx = ProbeContext(nvml=FakeNvml(total=total_mib * MIB), workload=Workload(width=width, height=height), env={})
    return memory_plan.probe(ctx)


def test_memory_plan_follows_cuda_visible_devices():
    assert memory_plan.visible_nvml_index({"CUDA_VISIBLE_DEVICES": "3,1"}) == 3
    assert memory_plan.visible_nvml_index({"CUDA_VISIBLE_DEVICES": "GPU-abc"}) == 0
    assert memory_plan.visible_nvml_index({}) == 0


# --- roofline ------------------------------------------------------------------------------------------

def test_datasheet_lookup():
    assert roofline.datasheet("NVIDIA H100 80GB HBM3")["gpu"] == "H100 SXM"
    assert roofline.datasheet("NVIDIA H100 PCIe")["bf16_tflops"] == 756
    assert roofline.datasheet("NVIDIA H200")["memory_tbps"] == 4.8
    assert roofline.datasheet("NVIDIA A100-SXM4-80GB")["fp8_tflops"] is None
    assert roofline.datasheet("NVIDIA L40S")["fp8_tflops"] == 733
    assert roofline.datasheet("NVIDIA GeForce RTX 4090")["bf16_tflops"] == 165
    assert roofline.datasheet("NVIDIA B200") is None


H100_FACTS = {"index": 0, "power_limit_w": 700.0, "default_power_limit_w": 700.0, "max_power_limit_w": 700.0,
              "throttle_mask": 0x4, "sm_clock_mhz": 1755, "max_sm_clock_mhz": 1980}


def test_roofline_healthy_h100_is_ok():
    f = roofline.summarize("NVIDIA H100 80GB HBM3", 795.0, 1350.0, 3000.0, H100_FACTS)
    assert f.status == "ok", f.summary
    m = f.measured
    assert m["fraction_of_datasheet"]["bf16"] == pytest.approx(0.804, abs=1e-3)
    assert m["throttle_reasons"] == ["sw_power_cap"] and m["power_limit_w"] == 700.0
    # What this card model measured before, with its source.
    assert any(d.startswith("measured on NVIDIA H100 80GB HBM3 (benchmarks/check/check_h100.json): bf16 790 TFLOP/s "
                            "(80% of 989)") and "copy 3.03 TB/s" in d for d in f.details)


def test_roofline_on_a_gpu_not_measured_quotes_no_other_cards_figures():
    f = roofline.summarize("NVIDIA H200", 800.0, 1500.0, 4200.0, None)
    assert f.status == "ok" and f.measured["datasheet"]["gpu"] == "H200"
    assert "typical rates not measured on NVIDIA H200 (probes/measured.toml); only < 65% of the datasheet is flagged" \
        in f.details
    assert not any("790" in d or "H100" in d for d in f.details)


@pytest.mark.parametrize("name,facts,rates,word,fix", [
    ("NVIDIA H100 80GB HBM3", {**H100_FACTS, "power_limit_w": 500.0}, (700, 1300, 2900), "power-capped", "-pl 700"),
    ("NVIDIA H100 80GB HBM3", {**H100_FACTS, "throttle_mask": 0x40 | 0x4}, (790, 1300, 2900), "throttled",
     "TEMPERATURE"),
    ("NVIDIA H100 PCIe", {**H100_FACTS, "power_limit_w": 350.0, "default_power_limit_w": 350.0}, (600, 1200, 1900),
     "PCIe", "software"),
    ("NVIDIA H100 80GB HBM3", H100_FACTS, (500, 1000, 2900), "bf16 at 51%", "nvidia-smi"),
])
def test_roofline_flags(name, facts, rates, word, fix):
    f = roofline.summarize(name, *rates, facts)
    assert f.status == "warn" and word in f.summary and fix in f.fix


def test_roofline_unknown_gpu_and_skip():
    f = roofline.summarize("NVIDIA B200", 1800.0, 3500.0, 7000.0, None)
    assert f.status == "ok" and f.measured["datasheet"] is None and f.measured["fraction_of_datasheet"] is None
    assert roofline.probe(ProbeContext(import_module=importer(torch=no_cuda_torch()))).status == "skip"


def test_roofline_measures_end_to_end_on_fake_cuda(monkeypatch):
    monkeypatch.setattr(roofline, "N", 64)
    monkeypatch.setattr(roofline, "COPY_BYTES", 1 * MIB)
    nvml = FakeNvml(limit_mw=450_000, throttle=0x1)
    f = roofline.probe(ProbeContext(import_module=importer(torch=CudaOnCpuTorch()), nvml=nvml, env={}))
    assert f.status == "warn" and "power-capped at 450 W" in f.summary and nvml.shutdowns == 1
    m = f.measured
    assert m["bf16_tflops"] is not None and m["copy_gbps"] is not None and m["throttle_reasons"] == ["gpu_idle"]
    assert m["default_power_limit_w"] == 700.0 and m["datasheet"]["gpu"] == "H100 SXM"
    assert m["fp8_tflops"] is not None or any("FP8 GEMM did not run" in d for d in f.details)


# --- on this machine, through the worker -----------------------------------------------------------------

@pytest.mark.parametrize("probe_id", ["attention_truth", "model", "memory_plan", "roofline"])
def test_worker_on_this_machine_is_honest(probe_id, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, "-m", "probes._worker", probe_id], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    f = json.loads(res.stdout)
    on_gpu = shutil.which("nvidia-smi") is not None
    assert f["id"] == probe_id and f["status"] in (("skip", "warn", "ok") if on_gpu else ("skip", "warn")), f
    if f["status"] == "warn":
        assert f["fix"]
