"""The kernel probes (flash_attn, tf32, fp8, compile, env) with injected fakes, plus real runs on this CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from probes.context import ProbeContext

ABI_ERR = ("Traceback (most recent call last):\n  File \"<string>\", line 1, in <module>\n"
           "  File \"/venv/lib/python3.12/site-packages/flash_attn/__init__.py\", line 3, in <module>\n"
           "ImportError: /venv/lib/python3.12/site-packages/flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so: "
           "undefined symbol: _ZN3c104cuda9SetDeviceEab\n")
CUTLASS_ERR = ("Traceback (most recent call last):\n  File \"/venv/flash_attn/cute/flash_fwd_sm90.py\", line 9\n"
               "ModuleNotFoundError: No module named 'cutlass.cute'\n")


from tests.fakes import fake_import  # noqa: E402


def fake_packages(dists=(), specs=()):
    """Fake importlib.metadata / importlib.util: `dists` {dist: version}, `specs` {module: spec}."""
    dists, specs = dict(dists), dict(specs)

    def version(dist):
        if dist not in dists:
            raise LookupError(dist)  # stands in for PackageNotFoundError
        return dists[dist]

    return {"importlib__metadata": SimpleNamespace(version=version),
            "importlib__util": SimpleNamespace(find_spec=lambda name: specs.get(name))}


def fake_run(by_module):
    """ctx.run for `python -c "import X"`: by_module {X: (returncode, stderr)}; records the calls."""
    calls = []

    def run(argv, timeout):
        calls.append(list(argv))
        module = argv[-1].removeprefix("import ")
        rc, err = by_module.get(module, (0, ""))
        return subprocess.CompletedProcess(argv, rc, "", err)

    run.calls = calls
    return run


H100 = "NVIDIA H100 80GB HBM3"  # a card probes/measured.toml has figures for
H200 = "NVIDIA H200"  # one it has none for


def fake_cuda_torch(version="2.11.0+cu128", cuda="12.8", available=True, cc=(9, 0), abi=True, name=H100):
    def get_device_name(i=0):
        if not available:
            raise RuntimeError("Found no NVIDIA driver on your system")
        return name

    return SimpleNamespace(__version__=version, version=SimpleNamespace(cuda=cuda),
                           _C=SimpleNamespace(_GLIBCXX_USE_CXX11_ABI=abi), bfloat16="bf16",
                           cuda=SimpleNamespace(is_available=lambda: available, get_device_capability=lambda i=0: cc,
                                                get_device_name=get_device_name))


def py_tag():
    return f"cp{sys.version_info[0]}{sys.version_info[1]}"


# --- flash_attn ---------------------------------------------------------------------------------------

def test_flash_attn_none_installed_is_ok_and_honest():
    from probes import flash_attn

    run = fake_run({})
    ctx = ProbeContext(import_module=fake_import(torch=fake_cuda_torch(), **fake_packages()), run=run)
    f = flash_attn.probe(ctx)
    assert f.status == "ok" and "no flash-attention package installed" in f.summary
    assert "cuDNN" in f.summary and "install_flash_attention.sh --which fa4" in f.summary and f.fix is None
    assert any("`fa4`" in d and "qwendoctor tune" in d for d in f.details)
    # The figures measured on this card, with the file that holds them.
    assert any(d.startswith(f"honest default: measured on {H100} (benchmarks/fa4/fa4_h100.json)") and "651-660" in d
               and "benchmarks/check/check_h100.json" in d for d in f.details)
    assert (f"measured on {H100}, this GPU's model, FA4 took 2.6% off an eager step (benchmarks/fa4/fa4_h100.json)"
            in f.summary)
    assert run.calls == []  # nothing to import
    assert set(f.measured) == {"fa2", "fa3", "fa4"}
    assert set(f.measured["fa2"]) >= {"installed", "version", "imports", "error", "rel_err"}
    assert not any(m["installed"] for m in f.measured.values())


def test_flash_attn_without_a_gpu_gives_no_gpu_advice():
    from probes import flash_attn

    ctx = ProbeContext(import_module=fake_import(torch=fake_cuda_torch(available=False), **fake_packages()),
                       run=fake_run({}))
    f = flash_attn.probe(ctx)
    assert f.status == "ok" and f.fix is None
    assert f.summary == "no flash-attention package installed; it runs on NVIDIA GPUs only, so this machine needs none"


def test_flash_attn_on_a_gpu_not_measured_says_so():
    from probes import flash_attn

    ctx = ProbeContext(import_module=fake_import(torch=fake_cuda_torch(name=H200), **fake_packages()), run=fake_run({}))
    f = flash_attn.probe(ctx)
    assert f.status == "ok" and f"FA4's gain was not measured on {H200}" in f.summary
    [note] = [d for d in f.details if d.startswith("honest default:")]
    assert note.startswith(f"honest default: not measured on {H200}; on {H100} (benchmarks/fa4/fa4_h100.json)")


def test_flash_attn_abi_mismatch_fails_and_names_the_wheel():
    from probes import flash_attn

    run = fake_run({"flash_attn": (1, ABI_ERR)})
    pk = fake_packages({"flash-attn": "2.8.3"}, {"flash_attn": SimpleNamespace(origin="/x/flash_attn/__init__.py")})
    f = flash_attn.probe(ProbeContext(import_module=fake_import(torch=fake_cuda_torch(), **pk), run=run))
    wheel = f"flash_attn-2.8.3+cu12torch2.11cxx11abiTRUE-{py_tag()}-{py_tag()}-linux_"
    assert f.status == "fail"
    assert "ABI mismatch" in f.summary and "FA2 2.8.3" in f.summary
    assert wheel in f.measured["fa2"]["problem"] and wheel in f.fix
    assert "releases/download/v2.8.3/" in f.fix and "pip uninstall -y flash-attn" in f.fix
    assert f.measured["fa2"]["imports"] is False and "undefined symbol" in f.measured["fa2"]["error"]
    assert f.measured["fa2"]["error"].startswith("ImportError:")
    assert run.calls == [[sys.executable, "-c", "import flash_attn"]]


def test_flash_attn_real_subprocess_import(tmp_path, monkeypatch):
    """The real ctx.run path: a package whose import raises an ABI error in the child interpreter."""
    from probes import flash_attn

    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ImportError('/x/flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEab')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    pk = fake_packages({"flash-attn": "2.8.3"})
    f = flash_attn.probe(ProbeContext(import_module=fake_import(torch=fake_cuda_torch(), **pk)))
    assert f.status == "fail" and "ABI mismatch" in f.summary
    assert f.measured["fa2"]["error"].startswith("ImportError: /x/flash_attn_2_cuda.so: undefined symbol")


def test_fa2_wheel_tag_follows_torch():
    from probes.flash_attn import fa2_wheel

    facts = {"torch": "2.11.0+cu130", "cuda": "13.0", "cxx11abi": False}
    assert fa2_wheel(facts, "2.7.4.post1").startswith("flash_attn-2.7.4.post1+cu13torch2.11cxx11abiFALSE-")
    assert fa2_wheel({"torch": "2.13.0+cpu", "cuda": None, "cxx11abi": True}, None) is None


def test_fa3_on_non_hopper_gpu_warns():
    from probes import flash_attn

    pk = fake_packages({"flash-attn-3": "3.0.0b1"}, {"flash_attn_interface": SimpleNamespace(origin="/x.py")})
    ctx = ProbeContext(import_module=fake_import(torch=fake_cuda_torch(cc=(8, 9)), **pk), run=fake_run({}))
    f = flash_attn.probe(ctx)
    assert f.status == "warn" and "Hopper-only" in f.summary and "sm_89" in f.summary
    assert "pip uninstall -y flash-attn-3" in f.fix
    assert f.measured["fa3"]["installed"] and f.measured["fa3"]["rel_err"] is None


def test_fa4_missing_cutlass_fails_with_the_deps_to_install():
    from probes import flash_attn

    pk = fake_packages({"flash-attn-4": "4.0.0b36"})
    ctx = ProbeContext(import_module=fake_import(torch=fake_cuda_torch(), **pk),
                       run=fake_run({"flash_attn.cute": (1, CUTLASS_ERR)}))
    f = flash_attn.probe(ctx)
    assert f.status == "fail" and "cutlass.cute" in f.summary and "missing dependency" in f.summary
    assert f.fix == ("pip install nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-core quack-kernels apache-tvm-ffi "
                     "torch-c-dlpack-ext")
    assert f.measured["fa4"]["version"] == "4.0.0b36" and f.measured["fa2"]["installed"] is False


def test_import_segfault_is_classified():
    from probes import flash_attn

    pk = fake_packages({"flash-attn": "2.8.3"})
    ctx = ProbeContext(import_module=fake_import(torch=fake_cuda_torch(), **pk),
                       run=fake_run({"flash_attn": (-11, "")}))
    f = flash_attn.probe(ctx)
    assert f.status == "fail" and "SIGSEGV" in f.summary


@pytest.mark.parametrize("text, expect", [
    ("RuntimeError: CUDA error: no kernel image is available for execution on the device", "wrong GPU architecture"),
    ("ImportError: libcudart.so.12: cannot open shared object file: No such file", "libcudart.so.12"),
    ("ModuleNotFoundError: No module named 'einops'", "missing dependency: einops"),
    ("ModuleNotFoundError: No module named 'flash_attn_2_cuda'", "broken install"),
    ("RuntimeError: something else", "FA2 fails: RuntimeError: something else"),
])
def test_classify(text, expect):
    from probes.flash_attn import classify

    problem, fix = classify("fa2", 1, text, {"torch": "2.11.0", "cuda": "12.8", "cxx11abi": True}, "2.8.3", (8, 0))
    assert expect in problem and fix


def _numbers_ctx(monkeypatch, fn):
    import torch

    from probes import flash_attn

    monkeypatch.setattr(flash_attn, "_check_device", lambda t: ("cpu", torch.float32))
    fake_fa = SimpleNamespace(flash_attn_func=fn)
    pk = fake_packages({"flash-attn": "2.8.3"}, {"flash_attn": SimpleNamespace(origin="/x/__init__.py")})
    return flash_attn, ProbeContext(import_module=fake_import(flash_attn=fake_fa, **pk), run=fake_run({}))


def _sdpa_bshd(q, k, v):
    import torch

    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def test_fa2_right_numbers_ok(monkeypatch):
    flash_attn, ctx = _numbers_ctx(monkeypatch, lambda q, k, v: (_sdpa_bshd(q, k, v), None))  # tuple like FA3/4
    f = flash_attn.probe(ctx)
    assert f.status == "ok" and "FA2 2.8.3" in f.summary and "numbers match" in f.summary
    assert f.measured["fa2"]["imports"] is True and f.measured["fa2"]["rel_err"] < 1e-5


def test_fa2_wrong_numbers_fail(monkeypatch):
    flash_attn, ctx = _numbers_ctx(monkeypatch, lambda q, k, v: v)
    f = flash_attn.probe(ctx)
    assert f.status == "fail" and "wrong numbers" in f.summary and f.fix
    assert f.measured["fa2"]["rel_err"] > 2e-2


def test_fa2_imports_without_gpu_skips_numbers():
    from probes import flash_attn

    pk = fake_packages({"flash-attn": "2.8.3"})
    ctx = ProbeContext(import_module=fake_import(torch=fake_cuda_torch(available=False), **pk), run=fake_run({}))
    f = flash_attn.probe(ctx)
    assert f.status == "ok" and "not checked" in f.summary
    assert any("numerical check skipped" in d for d in f.details)


# --- tf32 ---------------------------------------------------------------------------------------------

def test_tf32_on_cpu_skips_and_reports_flags():
    from probes import tf32

    f = tf32.probe(ProbeContext(env={}))
    assert f.status == "skip" and "bf16" in f.summary
    assert {"matmul_allow_tf32", "cudnn_allow_tf32", "float32_matmul_precision"} <= set(f.measured)
    assert "tf32_tflops" not in f.measured


def test_tf32_with_fake_cuda_measures(monkeypatch):
    from probes import tf32

    torch = SimpleNamespace(
        backends=SimpleNamespace(cuda=SimpleNamespace(matmul=SimpleNamespace(allow_tf32=True)),
                                 cudnn=SimpleNamespace(allow_tf32=True)),
        get_float32_matmul_precision=lambda: "high", cuda=SimpleNamespace(is_available=lambda: True))
    monkeypatch.setattr(tf32, "matmul_tflops", lambda t, on: 380.0 if on else 51.0)
    f = tf32.probe(ProbeContext(env={}, import_module=fake_import(torch=torch)))
    assert f.status == "ok" and "bf16" in f.summary
    assert f.measured["tf32_tflops"] == 380.0 and f.measured["fp32_tflops"] == 51.0
    assert f.measured["matmul_allow_tf32"] is True and f.measured["float32_matmul_precision"] == "high"
    assert any("51.0 TFLOP/s with TF32 off, 380.0 TFLOP/s with TF32 on" in d for d in f.details)


def test_tf32_context_restores_flags():
    import torch

    from probes import tf32

    before = tf32.read_flags(torch)
    with tf32.tf32_matmul(torch, True):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert tf32.read_flags(torch) == before


# --- fp8 ----------------------------------------------------------------------------------------------

def _fp8_ctx(torch, **mods):
    mods.setdefault("torchao", SimpleNamespace(__version__="0.18.0"))
    mods.setdefault("torchao__quantization", SimpleNamespace(Float8DynamicActivationFloat8WeightConfig=object))
    return ProbeContext(import_module=fake_import(torch=torch, **mods))


def test_fp8_no_cuda_skips():
    from probes import fp8

    f = fp8.probe(_fp8_ctx(fake_cuda_torch(version="2.13.0+cpu", cuda=None, available=False)))
    assert f.status == "skip"
    assert any(d.startswith(f"FP8 speed not measured on this machine (no GPU); on {H100}: eager FP8 1793.7 vs 637.3")
               for d in f.details)


@pytest.mark.parametrize("name", [H100, H200])
def test_fp8_speed_is_quoted_with_its_card_and_source(monkeypatch, name):
    from probes import fp8

    monkeypatch.setattr(fp8, "scaled_mm_rel_err", lambda t, d: 0.04)
    f = fp8.probe(_fp8_ctx(fake_cuda_torch(name=name)))
    [note] = [d for d in f.details if d.startswith("FP8 speed")]
    head = f"FP8 speed measured on {H100}:" if name == H100 else f"FP8 speed not measured on {H200}; on {H100}:"
    assert f.status == "ok" and note.startswith(head)
    assert "1793.7 vs 637.3 ms/step bf16" in note and "(benchmarks/bench/bench-synthetic-1328x1328.md)" in note
    assert "404.6 vs 650.6 ms/step (benchmarks/tune/w1/bench-coordinate-descent.md)" in note
    assert "1.6" not in f.summary and "ms/step" not in f.summary  # the summary quotes no card's figures


def test_fp8_old_gpu_warns():
    from probes import fp8

    f = fp8.probe(_fp8_ctx(fake_cuda_torch(cc=(8, 0))))
    assert f.status == "warn" and "Ada/Hopper" in f.summary and "left out of tune" in f.summary
    assert f.measured["cc"] == "8.0"


def test_fp8_torchao_missing_warns():
    from probes import fp8

    missing = ModuleNotFoundError("No module named 'torchao'", name="torchao")
    f = fp8.probe(_fp8_ctx(fake_cuda_torch(), torchao=missing))
    assert f.status == "warn" and f.fix == "pip install torchao" and f.measured["torchao_state"] == "missing"


def test_fp8_torchao_import_error_fails_naming_torch():
    from probes import fp8

    err = ImportError("/x/torchao/_C.so: undefined symbol: _ZN2at4_ops")
    f = fp8.probe(_fp8_ctx(fake_cuda_torch(version="2.11.0+cu128"), torchao=err))
    assert f.status == "fail" and "torch 2.11.0+cu128" in f.summary and "undefined symbol" in f.summary
    assert "torchao" in f.fix and "2.11.0" in f.fix


def test_fp8_torchao_without_config_fails():
    from probes import fp8

    f = fp8.probe(_fp8_ctx(fake_cuda_torch(), torchao__quantization=SimpleNamespace()))
    assert f.status == "fail" and "Float8DynamicActivationFloat8WeightConfig" in f.summary


def test_fp8_scaled_mm_ok_and_failing(monkeypatch):
    from probes import fp8

    monkeypatch.setattr(fp8, "scaled_mm_rel_err", lambda t, d: 0.04)
    f = fp8.probe(_fp8_ctx(fake_cuda_torch()))
    assert f.status == "ok" and f.measured["scaled_mm_rel_err"] == 0.04 and f.measured["torchao"] == "0.18.0"

    def boom(t, d):
        raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0")

    monkeypatch.setattr(fp8, "scaled_mm_rel_err", boom)
    f = fp8.probe(_fp8_ctx(fake_cuda_torch()))
    assert f.status == "fail" and "_scaled_mm" in f.summary and "cu128" in f.fix


def test_fp8_scaled_mm_real_on_cpu():
    import torch

    from probes import fp8

    try:
        err = fp8.scaled_mm_rel_err(torch, "cpu")
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch has no CPU _scaled_mm: {exc}")
    assert 0 < err < fp8.REL_ERR_LIMIT


# --- compile ------------------------------------------------------------------------------------------

def test_compile_real_on_this_cpu(tmp_path):
    from probes import compile as compile_probe

    f = compile_probe.probe(ProbeContext(env={}, disk_paths={"inductor_cache": tmp_path / "ind"}))
    assert f.status == "ok", (f.summary, f.details)
    assert f.measured["compile_s"] > 0 and f.measured["cache_writable"] is True
    assert f.measured["triton"] is None and any("triton is not needed" in d for d in f.details)
    assert (tmp_path / "ind").is_dir() and not list((tmp_path / "ind").iterdir())


@pytest.fixture
def fast_compile(monkeypatch):
    from probes import compile as compile_probe

    monkeypatch.setattr(compile_probe, "tiny_compile", lambda torch, device: (0.5, 0.0))
    return compile_probe


def test_compile_cache_in_the_way_warns(tmp_path, fast_compile):
    (tmp_path / "file").write_text("x")  # a file where a directory should be (root ignores read-only dirs)
    f = fast_compile.probe(ProbeContext(env={}, disk_paths={"inductor_cache": tmp_path / "file" / "ind"}))
    assert f.status == "warn" and "not writable" in f.summary
    assert f.fix.startswith("export TORCHINDUCTOR_CACHE_DIR=") and f.measured["cache_writable"] is False


@pytest.mark.parametrize("var", ["TORCH_COMPILE_DISABLE", "TORCHDYNAMO_DISABLE"])
def test_compile_disabled_warns(tmp_path, fast_compile, var):
    f = fast_compile.probe(ProbeContext(env={var: "1"}, disk_paths={"inductor_cache": tmp_path}))
    assert f.status == "warn" and var in f.summary and f.fix == f"unset {var}"


def test_compile_failure_fails_with_compiler_hint(tmp_path, monkeypatch):
    from probes import compile as compile_probe

    def boom(torch, device):
        raise RuntimeError("backend='inductor' raised:\nInvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(compile_probe, "tiny_compile", boom)
    f = compile_probe.probe(ProbeContext(env={}, disk_paths={"inductor_cache": tmp_path}))
    assert f.status == "fail" and "backend='inductor'" in f.summary and "apt-get install -y g++" in f.fix
    assert any("InvalidCxxCompiler" in d for d in f.details)


# --- env ----------------------------------------------------------------------------------------------

def test_env_clean_is_ok():
    from probes import env

    f = env.probe(ProbeContext(env={"HOME": "/root", "PATH": "/bin"}))
    assert f.status == "ok" and f.measured == {} and f.fix is None


def test_env_info_only_is_ok():
    from probes import env

    e = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "0",
         "DIFFUSERS_ATTN_BACKEND": "native", "CUDA_LAUNCH_BLOCKING": "0", "TORCH_COMPILE_DISABLE": "0"}
    f = env.probe(ProbeContext(env=e))
    assert f.status == "ok" and f.measured == e
    assert any("expandable_segments:True" in d for d in f.details)


@pytest.mark.parametrize("name, value, words", [
    ("CUDA_LAUNCH_BLOCKING", "1", "serializes every kernel launch"),
    ("TORCH_COMPILE_DISABLE", "1", "silently does nothing"),
    ("TORCHDYNAMO_DISABLE", "1", "silently does nothing"),
    ("DIFFUSERS_ATTN_BACKEND", "flash", "'flash' overrides the attention backend"),
    ("CUDA_VISIBLE_DEVICES", "", "no GPU is visible"),
    ("CUDA_VISIBLE_DEVICES", "-1", "no GPU is visible"),
    ("TORCH_LOGS", "+dynamo", "slows compilation"),
    ("TORCH_COMPILE_DEBUG", "1", "slower compiles"),
])
def test_env_flags(name, value, words):
    from probes import env

    f = env.probe(ProbeContext(env={name: value, "HF_HUB_OFFLINE": "1"}))
    assert f.status == "warn" and name in f.summary and f.fix == f"unset {name}"
    assert any(words in d for d in f.details), f.details
    assert f.measured == {name: value, "HF_HUB_OFFLINE": "1"}


def test_env_several_flags_one_fix():
    from probes import env

    f = env.probe(ProbeContext(env={"CUDA_LAUNCH_BLOCKING": "1", "TORCH_LOGS": "recompiles"}))
    assert f.fix == "unset CUDA_LAUNCH_BLOCKING TORCH_LOGS"


# --- the real runs on this machine, through the worker ----------------------------------------------------

@pytest.mark.parametrize("probe_id", ["flash_attn", "tf32", "env", "bytecode"])
def test_worker_runs_probe_honestly(probe_id):
    res = subprocess.run([sys.executable, "-m", "probes._worker", probe_id], capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    finding = json.loads(res.stdout)
    assert finding["id"] == probe_id and finding["status"] != "crash", finding
    import torch

    if not torch.cuda.is_available() and probe_id == "tf32":
        assert finding["status"] == "skip"


def test_fp8_without_cuda_reads_torchao_metadata_instead_of_importing_it():
    from probes import fp8

    refuse = AssertionError("torchao imported without a GPU")
    torch = fake_cuda_torch(version="2.13.0+cpu", cuda=None, available=False)
    f = fp8.probe(_fp8_ctx(torch, torchao=refuse, torchao__quantization=refuse,
                           **fake_packages(dists={"torchao": "0.18.0"})))
    assert f.status == "skip" and f.measured["torchao"] == "0.18.0"
    assert f.measured["torchao_state"] == "not_imported" and "not imported without a CUDA GPU" in f.details[0]
    f = fp8.probe(_fp8_ctx(torch, torchao=refuse, **fake_packages()))
    assert f.status == "skip" and f.measured["torchao_state"] == "missing"


def test_fp8_asks_for_the_gpu_before_its_kernels(monkeypatch):
    from probes import fp8

    calls = []
    monkeypatch.setattr(fp8, "scaled_mm_rel_err", lambda t, d: calls.append("kernels") or 0.04)
    ctx = _fp8_ctx(fake_cuda_torch())
    ctx.gpu_gate = lambda: calls.append("gate")
    assert fp8.probe(ctx).status == "ok" and calls == ["gate", "kernels"]


def test_compile_reports_the_fx_graph_cache_outcome():
    from probes import compile as compile_probe
    from tests.fakes import fake_import

    def ctx(counters):
        return ProbeContext(import_module=fake_import(
            torch___dynamo__utils=SimpleNamespace(counters={"inductor": counters})))

    assert compile_probe.fx_graph_cache(ctx({"fxgraph_cache_hit": 1})) == "hit"
    assert compile_probe.fx_graph_cache(ctx({"fxgraph_cache_miss": 1, "fxgraph_cache_hit": 0})) == "miss"
    assert compile_probe.fx_graph_cache(ctx({})) is None
    assert compile_probe.fx_graph_cache(ProbeContext(import_module=fake_import(
        torch___dynamo__utils=ImportError("no dynamo")))) is None
