"""The imports probe: packages imported in a fresh interpreter, import errors explained from the error and the
installed packages' requirements, hangs and crashes as their own states, and the probes an import failure
blocks. Packages are written to a temporary directory as pip would leave them (tests.fakes.write_package)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from types import SimpleNamespace

import pytest

from probes import imports
from probes._import_child import describe
from probes.context import ProbeContext
from probes.imports import Target
from tests.fakes import FakeMetadata, fake_import, write_package

# The report of the issue: huggingface_hub installed, its own requirement httpx2 not.
HUB_WITHOUT_HTTPX2 = FakeMetadata({
    "diffusers": ("0.42.1", ["huggingface-hub>=0.34", "numpy", "torch>=2.5; extra == 'torch'"], ["diffusers"]),
    "huggingface-hub": ("2.4.0", ["httpx2<3,>=2.1", "filelock"], ["huggingface_hub"]),
    "filelock": ("3.20.0", [], ["filelock"]),
    "numpy": ("2.3.0", [], ["numpy"]),
})


def missing_httpx2_behind_a_lazy_module():
    """The exception diffusers' lazy module raises when huggingface_hub cannot import httpx2."""
    try:
        try:
            raise ModuleNotFoundError("No module named 'httpx2'", name="httpx2")
        except ModuleNotFoundError as exc:
            raise RuntimeError("Failed to import diffusers.models.attention_dispatch because of the following "
                               "error (look up to see its traceback):\nNo module named 'httpx2'") from exc
    except RuntimeError as exc:
        return exc


# --- explaining an import error --------------------------------------------------------------------------

def test_describe_finds_the_missing_module_behind_a_lazy_wrapper():
    info = describe(missing_httpx2_behind_a_lazy_module())
    assert info["error"].startswith("RuntimeError: Failed to import diffusers.models.attention_dispatch")
    assert info["missing"] == "httpx2" and info["chain"] == ["ModuleNotFoundError: No module named 'httpx2'"]
    # The innermost frame: the raise, or (as Python 3.11 reports it in some runs) its except line just below.
    assert re.search(r"test_probes_imports.py:3[45]: ", info["at"]), info["at"]
    assert describe(ValueError("not an import"))["missing"] is None


def test_diagnose_follows_the_requirements_from_the_package_imported():
    info = {**describe(missing_httpx2_behind_a_lazy_module()), "importer": "huggingface_hub._http"}
    found = imports.diagnose(info, HUB_WITHOUT_HTTPX2, "diffusers")
    assert found["reason"] == ("no module named 'httpx2', which huggingface-hub requires "
                               "(diffusers -> huggingface-hub -> httpx2), is not installed")
    assert found["required_by"] == ["diffusers", "huggingface-hub"] and found["dist"] == "httpx2"
    assert found["pip"] == 'python -m pip install "httpx2<3,>=2.1"'
    # Unreachable from the package imported: any installed package that declares it, then a guess.
    assert imports.diagnose(info, HUB_WITHOUT_HTTPX2, "numpy")["required_by"] == ["huggingface-hub"]
    guess = imports.diagnose({"missing": "zstd_x", "error": "x", "importer": "numpy.core"}, HUB_WITHOUT_HTTPX2,
                             "numpy")
    assert guess["pip"] == "python -m pip install zstd-x" and "no installed package declares it" in guess["reason"]


def test_diagnose_a_module_named_unlike_its_distribution_and_a_version_mismatch():
    metadata = FakeMetadata({"ourlib": ("1.0", ["PyYAML>=6", "numpy"], ["ourlib"]),
                             "numpy": ("2.3.0", [], ["numpy"]),
                             "huggingface-hub": ("0.20.0", [], ["huggingface_hub"]),
                             "transformers": ("5.0.0", ["huggingface-hub>=1.0"], ["transformers"])})
    # `yaml` is PyYAML's: the one requirement of the importing package that is not installed.
    found = imports.diagnose({"missing": "yaml", "error": "e", "importer": "ourlib.config"}, metadata, "ourlib")
    assert found["pip"] == 'python -m pip install "PyYAML>=6"' and found["required_by"] == ["ourlib"]
    # A module missing from an installed package: too old a release, or a broken one.
    found = imports.diagnose({"missing": "huggingface_hub.errors", "error": "e", "importer": "transformers.utils"},
                             metadata, "transformers")
    assert found["pip"] == "python -m pip install -U huggingface-hub" and "huggingface-hub 0.20.0 lacks it" in \
        found["reason"]
    info = describe(ImportError("cannot import name 'split_torch_state_dict' from 'huggingface_hub' (/x.py)"))
    found = imports.diagnose({**info, "importer": "transformers.modeling_utils"}, metadata, "transformers")
    assert found["pip"] == 'python -m pip install -U "huggingface-hub>=1.0"'
    assert "transformers requires huggingface-hub>=1.0" in found["reason"]


# --- the probe, with real child interpreters --------------------------------------------------------------

@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on the path of this process (for its metadata) and of the children it starts."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in [str(tmp_path), os.environ.get("PYTHONPATH")] if p))
    return tmp_path


def a_hub_without_its_requirement(site):
    """diffusers-like `qdtest_diff` -> `qdtest_hub`, whose declared requirement qdtest-httpx2 is not installed."""
    write_package(site, "qdtest-hub", "2.4.0", ["qdtest-httpx2>=2.1"],
                  {"qdtest_hub/__init__.py": "from . import _http\n", "qdtest_hub/_http.py": "import qdtest_httpx2\n"})
    write_package(site, "qdtest-diff", "0.42.1", ["qdtest-hub>=2"],
                  {"qdtest_diff/__init__.py": "", "qdtest_diff/models/__init__.py": "",
                   "qdtest_diff/models/attention_dispatch.py": "import qdtest_hub\n"})


def test_an_import_that_fails_names_the_missing_module_who_needs_it_and_the_pip_command(site, monkeypatch):
    a_hub_without_its_requirement(site)
    monkeypatch.setattr(imports, "TARGETS", (
        Target("json", "json", "json", "a package that imports"),
        Target("qdtest_diff", "qdtest-diff", "qdtest_diff.models.attention_dispatch", "the dispatcher"),
        Target("qdtest_absent", "qdtest-absent", "qdtest_absent", "nothing")))
    f = imports.probe(ProbeContext())
    assert f.status == "fail", f
    assert f.summary == ("qdtest_diff does not import: no module named 'qdtest_httpx2', which qdtest-hub requires "
                         "(qdtest-diff -> qdtest-hub -> qdtest-httpx2), is not installed; qdtest-absent is not "
                         "installed (needed for nothing)")
    assert f.fix == 'python -m pip install "qdtest-httpx2>=2.1"; python -m pip install qdtest-absent'
    entry = f.measured["packages"]["qdtest_diff"]
    assert entry["state"] == "fails" and entry["missing"] == "qdtest_httpx2"
    assert entry["required_by"] == ["qdtest-diff", "qdtest-hub"]
    assert f.measured["packages"]["json"]["state"] == "ok" and f.measured["failed"] == ["qdtest_diff", "qdtest_absent"]
    assert any(d.endswith("qdtest_hub/_http.py:1: import qdtest_httpx2") for d in f.details)


def test_an_import_that_hangs_is_its_own_state_and_the_rest_still_run(site, monkeypatch):
    write_package(site, "qdtest-hang", "1.0", [], {"qdtest_hang/__init__.py": "import time\ntime.sleep(60)\n"})
    monkeypatch.setattr(imports, "IMPORT_TIMEOUT_S", 1.5)
    monkeypatch.setattr(imports, "TARGETS", (Target("qdtest_hang", "qdtest-hang", "qdtest_hang", "a test"),
                                             Target("json", "json", "json", "a package that imports")))
    started = time.perf_counter()
    f = imports.probe(ProbeContext())
    assert time.perf_counter() - started < 15
    assert f.status == "fail" and f.measured["packages"]["qdtest_hang"]["state"] == "hangs"
    assert f.summary.startswith("importing qdtest_hang hangs: no answer within the limit of 1.5 s, stuck at ")
    assert f.summary.endswith("qdtest_hang/__init__.py:2 in <module>")
    assert "python -X importtime -c 'import qdtest_hang'" in f.fix
    assert f.measured["packages"]["json"]["state"] == "ok"


def test_an_import_that_kills_the_interpreter_is_reported_and_an_optional_one_only_warns(site, monkeypatch):
    write_package(site, "qdtest-abort", "1.0", [], {"qdtest_abort/__init__.py": "import os\nos.abort()\n"})
    monkeypatch.setattr(imports, "TARGETS", (
        Target("qdtest_abort", "qdtest-abort", "qdtest_abort", "the abort lever", optional=True),
        Target("json", "json", "json", "a package that imports"),
        Target("qdtest_not_here", "qdtest-not-here", "qdtest_not_here", "nothing", optional=True)))
    f = imports.probe(ProbeContext())
    assert f.status == "warn", f
    assert f.summary == ("importing qdtest_abort kills the interpreter (killed by SIGABRT): the abort lever left out")
    assert f.measured["packages"]["qdtest_abort"]["state"] == "crashes"
    assert f.measured["optional_failed"] == ["qdtest_abort"] and f.measured["failed"] == []
    assert "qdtest_not_here: not installed (optional: nothing)" in f.details  # not installed: not imported


def test_gpu_only_packages_are_imported_only_where_there_is_a_gpu(monkeypatch):
    ran = []

    def run(argv, timeout):
        ran.extend(arg.split("=")[0] for arg in argv[4:])
        keys = [arg.split("=")[0] for arg in argv[4:]]
        lines = [json.dumps({"key": key, "ok": True, "seconds": 0.1}) for key in keys]
        return subprocess.CompletedProcess(argv, 0, "\n".join(lines), "")

    monkeypatch.setattr(imports, "TARGETS", (Target("json", "json", "json", "x"),
                                             Target("torchao", "torchao", "torchao", "the FP8 levers", optional=True,
                                                    gpu_only=True)))
    def no_nvml():
        raise OSError("NVML Shared Library Not Found")

    util = SimpleNamespace(find_spec=lambda name: object())
    no_gpu = ProbeContext(run=run, nvml=no_nvml, import_module=fake_import(importlib__util=util))
    assert imports.probe(no_gpu).status == "ok" and ran == ["json"]
    ran.clear()
    gpu = SimpleNamespace(nvmlDeviceGetCount=lambda: 1, nvmlShutdown=lambda: None)
    f = imports.probe(ProbeContext(run=run, nvml=lambda: gpu, import_module=fake_import(importlib__util=util)))
    assert f.status == "ok" and ran == ["json", "torchao"] and f.summary.startswith("json, torchao import")


def test_the_packages_qwendoctor_uses_import_here():
    """The real targets against this environment: every module and name in TARGETS exists."""
    f = imports.probe(ProbeContext())
    assert f.status == "ok", (f.summary, f.details)
    assert {"torch", "transformers", "diffusers", "optuna"} <= set(f.measured["packages"])


# --- the probes an import failure blocks -----------------------------------------------------------------

def test_attention_backends_is_blocked_not_crashed_when_diffusers_does_not_import():
    from probes import attention_backends

    ctx = ProbeContext(import_module=fake_import(
        diffusers__models__attention_dispatch=missing_httpx2_behind_a_lazy_module(),
        importlib__metadata=HUB_WITHOUT_HTTPX2))
    f = attention_backends.probe(ctx)
    assert f.status == "skip"
    assert f.summary == ("blocked: diffusers.models.attention_dispatch does not import: no module named 'httpx2', "
                         "which huggingface-hub requires (diffusers -> huggingface-hub -> httpx2), is not installed")
    assert f.fix == 'python -m pip install "httpx2<3,>=2.1"'
    assert f.measured["blocked_by"] == "imports" and f.measured["missing"] == "httpx2"
    assert not any("Traceback" in d for d in f.details)


@pytest.mark.parametrize("probe_id", ["tf32", "fp8", "compile", "attention_truth", "roofline"])
def test_probes_that_import_torch_are_blocked_when_it_does_not_import(probe_id):
    import importlib

    error = ModuleNotFoundError("No module named 'typing_extensions'", name="typing_extensions")
    metadata = FakeMetadata({"torch": ("2.13.0", ["typing-extensions>=4.10", "filelock"], ["torch"]),
                             "filelock": ("3.20.0", [], ["filelock"])})
    ctx = ProbeContext(import_module=fake_import(torch=error, importlib__metadata=metadata))
    f = importlib.import_module(f"probes.{probe_id}").probe(ctx)
    assert f.status == "skip" and f.measured["blocked_by"] == "imports", f
    assert f.summary == ("blocked: torch does not import: no module named 'typing_extensions', which torch "
                         "requires, is not installed")
    assert f.fix == 'python -m pip install "typing-extensions>=4.10"'


def test_check_reports_the_import_failure_once_and_the_probe_it_blocks_points_at_it(site, monkeypatch):
    """The issue end to end: diffusers' dispatcher does not import because a requirement of a requirement is
    missing. imports fails naming it; attention_backends, in its worker, is a skip pointing there."""
    from qwendoctor.doctor import exit_code, run_probes

    write_package(site, "qdtest-hub", "2.4.0", ["qdtest-httpx2>=2.1"],
                  {"qdtest_hub/__init__.py": "from . import _http\n", "qdtest_hub/_http.py": "import qdtest_httpx2\n"})
    # A diffusers that shadows the installed one (first on the path), as broken as the issue's.
    write_package(site, "diffusers", "0.99.0", ["qdtest-hub>=2"],
                  {"diffusers/__init__.py": "", "diffusers/models/__init__.py": "",
                   "diffusers/models/attention_dispatch.py": "import qdtest_hub\n"})
    monkeypatch.setattr(imports, "TARGETS", (Target("diffusers", "diffusers", "diffusers.models.attention_dispatch",
                                                    "the attention dispatcher"),))
    blocked, found = run_probes(["imports", "attention_backends"])  # the registry's order
    reason = ("no module named 'qdtest_httpx2', which qdtest-hub requires (diffusers -> qdtest-hub -> qdtest-httpx2), "
              "is not installed")
    assert found.status == "fail" and found.summary == f"diffusers does not import: {reason}"
    assert found.fix == 'python -m pip install "qdtest-httpx2>=2.1"'
    assert blocked.status == "skip", blocked
    assert blocked.summary == f"blocked: diffusers.models.attention_dispatch does not import: {reason} (see imports)"
    assert exit_code([found, blocked]) == 1
