"""Each probe with injected fakes (no GPU needed), plus the real attention probe on this CPU."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import probes
from probes import PROBES
from probes.context import ProbeContext, default_disk_paths, exc_line, first_line
from probes.finding import Finding

GIB = 1024**3


from tests.fakes import fake_import  # noqa: E402


def fake_run(returncode=0, stdout=""):
    calls = []

    def run(argv, timeout):
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, returncode, stdout, "")

    run.calls = calls
    return run


NVIDIA_SMI = "| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15    CUDA Version: 12.8     |\n"
NO_SMI = fake_run(127)


def fake_torch(version="2.8.0+cpu", cuda=None, available=False, arch_list=(), cc=(9, 0)):
    return SimpleNamespace(
        __version__=version,
        version=SimpleNamespace(cuda=cuda),
        backends=SimpleNamespace(cudnn=SimpleNamespace(version=lambda: 91002 if cuda else None)),
        cuda=SimpleNamespace(is_available=lambda: available, get_arch_list=lambda: list(arch_list),
                             get_device_capability=lambda i=0: cc),
    )


def test_registry_order_and_contract():
    assert [p.id for p in PROBES] == ["system", "gpu", "topology", "torch_build", "flash_attn", "attention_backends",
                                      "attention_truth", "tf32", "fp8", "compile", "diffusers", "imports", "model",
                                      "memory_plan", "env", "bytecode", "roofline"]
    assert [p.id for p in PROBES if not p.native] == ["system", "diffusers", "imports", "env"]
    assert [p.id for p in PROBES if p.tier == "bench"] == ["roofline"]
    assert all(p.timeout_s > 0 and p.title for p in PROBES)


def test_probe_modules_do_not_import_native_code():
    code = ("import sys, importlib, probes, probes._worker, probes.context\n"
            "for p in probes.PROBES: importlib.import_module(p.module)\n"
            "bad = [m for m in ('torch', 'diffusers', 'pynvml') if m in sys.modules]\n"
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_probes_stand_without_qwendoctor():
    """Every probes module imports, and a pure probe runs through the worker, with `qwendoctor` unimportable."""
    code = ("import importlib, importlib.abc, pkgutil, sys\n"
            "class Refuse(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'qwendoctor':\n"
            "            raise ImportError(f'probes imported {name}')\n"
            "sys.meta_path.insert(0, Refuse())\n"
            "import probes\n"
            "for module in pkgutil.iter_modules(probes.__path__):\n"
            "    importlib.import_module('probes.' + module.name)\n"
            "from probes._worker import run_one\n"
            "for probe_id in ('env', 'memory_plan'):\n"
            "    finding = run_one(probe_id)\n"
            "    assert finding['status'] != 'crash', finding\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'qwendoctor']")
    root = Path(probes.__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert res.returncode == 0, res.stderr


def test_context_defaults_follow_env(tmp_path):
    ctx = ProbeContext(env={"HF_HOME": str(tmp_path / "hf"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")})
    assert ctx.disk_paths == {"hf_cache": tmp_path / "hf" / "hub", "inductor_cache": tmp_path / "ind"}
    assert default_disk_paths({"HF_HUB_CACHE": "/x/hub", "HOME": "/h"})["hf_cache"].as_posix() == "/x/hub"
    assert default_disk_paths({"HOME": "/h"})["hf_cache"].as_posix() == "/h/.cache/huggingface/hub"
    assert ProbeContext().workload.image_tokens == 83 * 83  # Qwen-Image's default 1328x1328
    assert ProbeContext().text_tokens == 128
    assert ProbeContext().run(["definitely-not-a-program-xyz"], 5).returncode == 127
    assert exc_line(ValueError("first\nsecond")) == "ValueError: first"


def test_first_line_is_the_message_or_the_type():
    assert first_line(ValueError("  first\nsecond")) == "first"
    assert first_line(KeyError()) == "KeyError"  # an empty message still says something
    assert first_line(RuntimeError("\n\n")) == "RuntimeError"
    assert first_line(OSError("x" * 500)) == "x" * 297 + "..."
    assert first_line(OSError("abcdefghij"), limit=8) == "abcde..."


# --- system -------------------------------------------------------------------------------------------

def test_system_real_machine():
    from probes import system

    f = system.probe(ProbeContext())
    assert f.status in ("ok", "warn")
    assert set(f.measured) == {"python", "os", "cpus", "ram_gib", "disk_free_gib"}
    assert "hf_cache" in f.measured["disk_free_gib"]


def test_system_old_python_fails(tmp_path):
    from probes import system

    fake_sys = SimpleNamespace(version_info=(3, 10, 12, "final", 0), executable="/usr/bin/python3.10")
    f = system.probe(ProbeContext(import_module=fake_import(sys=fake_sys), disk_paths={"hf_cache": tmp_path}))
    assert f.status == "fail" and "3.10.12" in f.summary and "3.11" in f.fix


def test_system_low_disk_warns_unless_weights_cached(tmp_path):
    from probes import system

    shutil = SimpleNamespace(disk_usage=lambda p: SimpleNamespace(total=100 * GIB, used=90 * GIB, free=10 * GIB))
    ctx = ProbeContext(import_module=fake_import(shutil=shutil), disk_paths={"hf_cache": tmp_path / "hub"})
    f = system.probe(ctx)
    assert f.status == "warn" and "10.0 GiB free" in f.summary and "HF_HOME" in f.fix
    assert f.measured["disk_free_gib"] == {"hf_cache": 10.0}

    (tmp_path / "hub" / "models--Qwen--Qwen-Image").mkdir(parents=True)
    assert system.probe(ctx).status == "ok"


# --- torch_build --------------------------------------------------------------------------------------

def test_torch_cpu_build_on_gpu_machine_fails():
    from probes import torch_build

    run = fake_run(0, NVIDIA_SMI)
    f = torch_build.probe(ProbeContext(import_module=fake_import(torch=fake_torch()), run=run))
    assert f.status == "fail"
    assert "CPU-only" in f.summary
    assert f.fix == "pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu128"
    assert run.calls == [["nvidia-smi"]]
    assert f.measured["cuda"] is None and f.measured["cuda_available"] is False


def test_torch_cpu_build_without_gpu_is_ok():
    from probes import torch_build

    f = torch_build.probe(ProbeContext(import_module=fake_import(torch=fake_torch()), run=NO_SMI))
    assert f.status == "ok" and "CPU only" in f.summary and f.fix is None


def test_torch_cuda_build_usable():
    from probes import torch_build

    torch = fake_torch("2.9.1+cu128", "12.8", True, ["sm_80", "sm_90", "sm_100", "sm_120"], (9, 0))
    torch.cuda.nccl = SimpleNamespace(version=lambda: (2, 27, 3))
    metadata = fake_metadata({"triton": "3.5.1", "nvidia-cudnn-cu12": "9.10.2.21"})
    f = torch_build.probe(ProbeContext(import_module=fake_import(torch=torch, importlib__metadata=metadata),
                                       run=fake_run(0, NVIDIA_SMI)))
    assert f.status == "ok", f.summary
    assert f.summary == "torch 2.9.1+cu128, CUDA 12.8, cuDNN 9.10.2, GPU usable"
    assert f.measured == {"torch": "2.9.1+cu128", "cuda": "12.8", "cudnn": 91002, "cuda_available": True,
                          "arch_list": ["sm_80", "sm_90", "sm_100", "sm_120"], "device_cc": "9.0",
                          "nccl": "2.27.3", "triton": "3.5.1", "cudnn_bundled": "9.10.2.21"}


def fake_metadata(versions):
    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    return SimpleNamespace(version=version)


def test_cudnn_shadowed_by_ld_library_path_warns():
    from probes import torch_build

    torch = fake_torch("2.9.1+cu128", "12.8", True, ["sm_90"], (9, 0))  # loads cuDNN 9.10.2
    metadata = fake_metadata({"triton": "3.5.1", "nvidia-cudnn-cu12": "9.19.0.56"})
    f = torch_build.probe(ProbeContext(import_module=fake_import(torch=torch, importlib__metadata=metadata),
                                       run=fake_run(0, NVIDIA_SMI),
                                       env={"LD_LIBRARY_PATH": "/usr/local/cuda/lib64"}))
    assert f.status == "warn"
    assert "cuDNN 9.10.2 is loaded but torch's wheel bundles 9.19.0.56" in f.summary
    assert "/usr/local/cuda/lib64" in f.summary and "LD_LIBRARY_PATH" in f.fix


def test_missing_triton_on_gpu_warns():
    from probes import torch_build

    torch = fake_torch("2.9.1+cu128", "12.8", True, ["sm_90"], (9, 0))
    f = torch_build.probe(ProbeContext(import_module=fake_import(torch=torch, importlib__metadata=fake_metadata({})),
                                       run=fake_run(0, NVIDIA_SMI)))
    assert f.status == "warn" and "triton is missing" in f.summary and f.fix == "pip install triton"


def test_torch_build_without_kernels_for_this_gpu_fails():
    from probes import torch_build

    torch = fake_torch("2.7.0+cu126", "12.6", True, ["sm_50", "sm_80", "sm_90"], (12, 0))
    smi = NVIDIA_SMI.replace("12.8", "13.0")
    f = torch_build.probe(ProbeContext(import_module=fake_import(torch=torch), run=fake_run(0, smi)))
    assert f.status == "fail" and "sm_120" in f.summary and f.fix.endswith("/cu130")


def test_torch_cuda_build_that_cannot_see_the_gpu_fails():
    from probes import torch_build

    torch = fake_torch("2.9.0+cu130", "13.0", available=False)
    f = torch_build.probe(ProbeContext(import_module=fake_import(torch=torch), run=fake_run(0, NVIDIA_SMI)))
    assert f.status == "fail" and "cannot use the GPU" in f.summary and "cu128" in f.fix


def test_old_torch_warns():
    from probes import torch_build

    f = torch_build.probe(ProbeContext(import_module=fake_import(torch=fake_torch("2.4.1+cpu")), run=NO_SMI))
    assert f.status == "warn" and "2.5" in f.summary and "torch>=2.5" in f.fix


def test_torch_missing_fails():
    from probes import torch_build

    f = torch_build.probe(ProbeContext(import_module=fake_import(torch=ImportError("No module named 'torch'")),
                                       run=NO_SMI))
    assert f.status == "fail" and "ImportError" in f.summary and "pip install" in f.fix


# --- gpu ----------------------------------------------------------------------------------------------

class FakeNVML:
    def __init__(self, gpus, driver="570.86.15", cuda=12080):
        self.gpus, self.driver, self.cuda, self.shut = gpus, driver, cuda, False

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetName(self, h):
        return h[0].encode()  # old pynvml returns bytes

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return h[1]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=h[2] * GIB)

    def nvmlShutdown(self):
        self.shut = True


def test_gpu_without_nvml_is_skip():
    from probes import gpu

    def no_nvml():
        raise OSError("NVML Shared Library Not Found")

    f = gpu.probe(ProbeContext(nvml=no_nvml))
    assert f.status == "skip" and f.summary == "no NVIDIA GPU (NVML not available)"


def test_gpu_h100_ok():
    from probes import gpu

    nvml = FakeNVML([("NVIDIA H100 80GB HBM3", (9, 0), 79.6)] * 2)
    f = gpu.probe(ProbeContext(nvml=lambda: nvml))
    assert f.status == "ok" and f.summary.startswith("2x NVIDIA H100 80GB HBM3 (cc 9.0")
    assert f.measured == {"gpus": [{"name": "NVIDIA H100 80GB HBM3", "cc": "9.0", "memory_gib": 79.6,
                                    "form_factor": "unknown"}] * 2,
                          "driver": "570.86.15", "driver_cuda": "12.8"}
    assert nvml.shut


def test_gpu_old_cc_warns_and_mentions_fp8():
    from probes import gpu

    f = gpu.probe(ProbeContext(nvml=lambda: FakeNVML([("Tesla T4", (7, 5), 15.0)])))
    assert f.status == "warn" and "8.0" in f.summary and f.fix
    assert any("FP8" in d and "8.9" in d for d in f.details)
    assert any("does not fit" in d for d in f.details)


def test_gpu_without_nvidia_ml_py_warns():
    from probes import gpu

    def missing():
        raise ImportError("No module named 'pynvml'")

    f = gpu.probe(ProbeContext(nvml=missing))
    assert f.status == "warn" and f.fix == "pip install nvidia-ml-py"


# --- diffusers ----------------------------------------------------------------------------------------

DIFFUSERS_TREE = {
    "__init__.py": '_import_structure = {"pipelines": []}\n_import_structure["pipelines"].extend(["QwenImagePipeline"])\n',
    "pipelines/__init__.py": "",
    "pipelines/qwenimage/__init__.py": "",
    "pipelines/qwenimage/pipeline_qwenimage.py": "class QwenImagePipeline(DiffusionPipeline):\n    pass\n",
    "models/__init__.py": "",
    "models/attention_dispatch.py": "def dispatch_attention_fn(query, key, value, backend=None):\n    pass\n",
    # set_attention_backend lives in a base class of another module, as a mixin might.
    "models/attention.py": "class AttentionMixin:\n    def set_attention_backend(self, backend):\n        pass\n",
    "models/modeling_utils.py": ("import torch\nfrom .attention import AttentionMixin\n\n"
                                 "class ModelMixin(torch.nn.Module, AttentionMixin):\n"
                                 "    def compile_repeated_blocks(self, *args):\n        pass\n"),
    "hooks/__init__.py": "if is_torch_available():\n    from .first_block_cache import FirstBlockCacheConfig\n",
    "hooks/first_block_cache.py": "class FirstBlockCacheConfig:\n    pass\n",
}
DIFFUSERS_METADATA = {"diffusers": "0.36.0", "transformers": "4.57.1", "huggingface-hub": "0.35.0"}


def fake_diffusers(tmp_path, versions=None, drop=(), replace=None, requires=None, importable=("diffusers",
                                                                                                "transformers")):
    """A diffusers source tree under tmp_path, fake importlib.metadata / importlib.util, and an import_module
    that refuses everything else: the probe must decide without importing diffusers or transformers."""
    from importlib.machinery import ModuleSpec

    files = {**DIFFUSERS_TREE, **(replace or {})}
    for name, text in files.items():
        if name not in drop:
            path = tmp_path / "diffusers" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    versions = dict(DIFFUSERS_METADATA if versions is None else versions)
    requires = requires or {}

    def version(dist):
        if dist not in versions:
            raise LookupError(dist)  # stands in for PackageNotFoundError
        return versions[dist]

    def find_spec(name):
        if name not in importable:
            return None
        spec = ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(tmp_path / name)]
        return spec

    modules = {"importlib.metadata": SimpleNamespace(version=version, requires=lambda d: requires.get(d, [])),
               "importlib.util": SimpleNamespace(find_spec=find_spec)}

    def import_module(name):
        if name not in modules:
            raise AssertionError(f"the diffusers probe imported {name}")
        return modules[name]

    return ProbeContext(import_module=import_module)


def test_diffusers_complete_is_ok_without_importing_it(tmp_path):
    from probes import diffusers

    f = diffusers.probe(fake_diffusers(tmp_path))
    assert f.status == "ok", (f.summary, f.details)
    assert f.summary == "diffusers 0.36.0, transformers 4.57.1"
    assert f.measured == {"diffusers": "0.36.0", "transformers": "4.57.1", "diffusers_path": str(tmp_path / "diffusers"),
                          "has_pipeline": True, "has_dispatcher": True, "has_cache_hooks": True,
                          "has_regional_compile": True, "unmet_requirements": []}


def test_diffusers_missing_or_without_qwen_fails(tmp_path):
    from probes import diffusers

    f = diffusers.probe(fake_diffusers(tmp_path / "a", versions={}, importable=()))
    assert f.status == "fail" and "not installed" in f.summary and "diffusers>=0.35" in f.fix
    # Metadata left behind without the package: says so, instead of "not installed".
    f = diffusers.probe(fake_diffusers(tmp_path / "b", importable=("transformers",)))
    assert f.status == "fail" and "0.36.0 has package metadata but is not importable" in f.summary
    # Exported name, but no class in pipelines/qwenimage (and the other way round).
    f = diffusers.probe(fake_diffusers(tmp_path / "c", drop=("pipelines/qwenimage/pipeline_qwenimage.py",)))
    assert f.status == "fail" and "QwenImagePipeline" in f.summary and f.measured["has_pipeline"] is False
    f = diffusers.probe(fake_diffusers(tmp_path / "d", replace={"__init__.py": "_import_structure = {}\n"}))
    assert f.status == "fail" and "QwenImagePipeline" in f.summary


@pytest.mark.parametrize("missing, change", [
    ("has_dispatcher", {"models/attention_dispatch.py": "def other():\n    pass\n"}),
    ("has_dispatcher", {"models/attention.py": "class AttentionMixin:\n    pass\n"}),
    ("has_cache_hooks", {"hooks/__init__.py": "from .other import Something\n"}),
    ("has_regional_compile", {"models/modeling_utils.py": "class ModelMixin:\n    def set_attention_backend(s):"
                                                          "\n        pass\n"}),
])
def test_diffusers_missing_features_warn(tmp_path, missing, change):
    from probes import diffusers

    f = diffusers.probe(fake_diffusers(tmp_path, replace=change))
    assert f.status == "warn" and f.fix == 'pip install -U "diffusers>=0.35"', f.summary
    assert f.measured[missing] is False
    assert [k for k, v in f.measured.items() if v is False] == [missing]


def test_diffusers_follows_absolute_imports_within_the_package(tmp_path):
    from probes import diffusers

    modeling = DIFFUSERS_TREE["models/modeling_utils.py"].replace("from .attention import",
                                                                  "from diffusers.models.attention import")
    hooks = "from diffusers.hooks.first_block_cache import FirstBlockCacheConfig\n"
    f = diffusers.probe(fake_diffusers(tmp_path / "a", replace={"models/modeling_utils.py": modeling,
                                                                 "hooks/__init__.py": hooks}))
    assert f.status == "ok", (f.summary, f.details)
    # Another package's class of the same name does not count.
    modeling = DIFFUSERS_TREE["models/modeling_utils.py"].replace("from .attention import", "from other import")
    f = diffusers.probe(fake_diffusers(tmp_path / "b", replace={"models/modeling_utils.py": modeling}))
    assert f.status == "warn" and f.measured["has_dispatcher"] is False


def test_diffusers_without_metadata_or_transformers(tmp_path):
    from probes import diffusers

    # A source tree on the path, no dist-info: everything checks out, but the version is unknown.
    f = diffusers.probe(fake_diffusers(tmp_path / "a", versions={"transformers": "4.57.1"}))
    assert f.status == "warn" and "no package metadata" in f.summary and f.measured["diffusers"] is None
    f = diffusers.probe(fake_diffusers(tmp_path / "b", versions={"diffusers": "0.36.0"}, importable=("diffusers",)))
    assert f.status == "fail" and "transformers is missing" in f.summary and "transformers>=4.51" in f.fix
    f = diffusers.probe(fake_diffusers(tmp_path / "c", versions={"diffusers": "0.36.0", "transformers": "4.40.0"}))
    assert f.status == "warn" and "older than 4.51" in f.summary


def test_diffusers_unmet_requirement_warns(tmp_path):
    from probes import diffusers

    requires = {"transformers": ["huggingface-hub<1.0,>=0.36", "torch>=2.2; extra == 'torch'",
                                 "tokenizers>=0.22; python_version < '3'"],
                "diffusers": ["regex!=2019.12.17", "huggingface-hub>=0.30"]}
    f = diffusers.probe(fake_diffusers(tmp_path, requires=requires))
    # Metadata only: whether the imports break is the imports probe's fail, not this one's.
    assert f.status == "warn", f.summary
    assert f.measured["unmet_requirements"] == [
        "diffusers requires regex!=2019.12.17, which is not installed",
        "transformers requires huggingface-hub<1.0,>=0.36, huggingface-hub 0.35.0 is installed"]
    assert f.summary.endswith("regex!=2019.12.17, which is not installed (and 1 more); the imports probe says "
                              "whether the imports break")
    assert f.fix == "pip install -U huggingface-hub regex"
    # A requirement without a version range: its name alone in the fix.
    f = diffusers.probe(fake_diffusers(tmp_path / "b", requires={"diffusers": ["importlib_metadata"]}))
    assert f.status == "warn" and f.fix == "pip install -U importlib_metadata"


def test_diffusers_counts_a_requirement_of_a_requirement(tmp_path):
    """huggingface_hub's own requirement missing breaks diffusers' imports as surely as one of diffusers'."""
    from probes import diffusers

    requires = {"diffusers": ["huggingface-hub>=0.30"], "transformers": ["huggingface-hub>=0.34,<1.0"],
                "huggingface-hub": ["httpx2<3,>=2.1", "filelock; extra == 'lock'"]}
    f = diffusers.probe(fake_diffusers(tmp_path, requires=requires))
    assert f.status == "warn", f.summary
    # Once, though diffusers and transformers both require huggingface_hub.
    assert f.measured["unmet_requirements"] == [
        "huggingface-hub requires httpx2<3,>=2.1, which is not installed (through diffusers -> huggingface-hub)"]
    assert f.fix == "pip install -U httpx2"


def test_diffusers_probe_reads_the_installed_diffusers():
    pytest.importorskip("diffusers")
    from probes import diffusers

    f = diffusers.probe(ProbeContext())
    assert f.status == "ok", (f.summary, f.details)
    assert all(f.measured[k] for k in ("has_pipeline", "has_dispatcher", "has_cache_hooks", "has_regional_compile"))


# --- attention_backends -------------------------------------------------------------------------------

def test_attention_backends_real_cpu():
    from probes import attention_backends

    f = attention_backends.probe(ProbeContext())
    assert f.status == "ok", f.summary
    m = f.measured
    assert m["device"] == "cpu"
    assert m["working"][:2] == ["native", "_native_math"]
    assert m["broken"]["_native_flash"] == "needs CUDA" and m["broken"]["flash"] == "needs CUDA"
    assert all(m["errors"][n] < 1e-4 for n in m["working"])
    assert set(m["working"]) | set(m["broken"]) == set(attention_backends.CANDIDATES)


def test_attention_backends_broken_native_fails():
    import torch

    from probes import attention_backends

    def dispatch_attention_fn(q, k, v, backend=None):
        if backend == "native":
            raise RuntimeError("CUDA error: no kernel image is available\nmore")
        return torch.zeros_like(q)  # runs, but wrong

    ctx = ProbeContext(import_module=fake_import(
        diffusers__models__attention_dispatch=SimpleNamespace(dispatch_attention_fn=dispatch_attention_fn)))
    f = attention_backends.probe(ctx)
    assert f.status == "fail" and f.fix
    assert f.measured["working"] == []
    assert f.measured["broken"]["native"] == "not working: RuntimeError: CUDA error: no kernel image is available"
    assert f.measured["broken"]["_native_math"].startswith("wrong result: relative error 1.00e+00")
    assert isinstance(f, Finding)
