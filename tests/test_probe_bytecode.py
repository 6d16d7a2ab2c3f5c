"""The bytecode probe: .pyc states read from real files, and its verdicts on fake module lists."""

from __future__ import annotations

import importlib.util
import os
import py_compile
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from probes import bytecode
from probes.context import ProbeContext
from tests.fakes import fake_import


def _module(name: str, source: Path, cached: Path | None):
    return SimpleNamespace(__spec__=SimpleNamespace(name=name, origin=str(source),
                                                    cached=str(cached) if cached else None))


def _package(tmp_path: Path, files: int = 3, compiled: bool = False) -> list:
    root = tmp_path / "site"
    (root / "fakelib").mkdir(parents=True)
    modules = []
    for i in range(files):
        source = root / "fakelib" / f"mod{i}.py"
        source.write_text("".join(f"def f{j}(x):\n    return x * {j} + {i}\n" for j in range(200)))
        cached = root / "fakelib" / "__pycache__" / f"mod{i}.{sys.implementation.cache_tag}.pyc"
        if compiled:
            py_compile.compile(str(source), cfile=str(cached), doraise=True)
        modules.append(_module(f"fakelib.mod{i}", source, cached))
    return modules


def test_bytecode_state_reads_the_pyc_header(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("x = 1\n")
    cached = tmp_path / "m.pyc"
    assert bytecode.bytecode_state(source, str(cached)) == "missing"
    assert bytecode.bytecode_state(source, None) == "missing"
    py_compile.compile(str(source), cfile=str(cached), doraise=True)
    assert bytecode.bytecode_state(source, str(cached)) == "current"
    source.write_text("x = 22\n")  # another size: the pyc no longer matches its source
    os.utime(source, (time.time() + 10, time.time() + 10))
    assert bytecode.bytecode_state(source, str(cached)) == "stale"
    cached.write_bytes(b"\0\0\0\0" + cached.read_bytes()[4:])  # another Python's magic number
    assert bytecode.bytecode_state(source, str(cached)) == "stale"


def test_python_sources_keeps_py_files_once():
    mods = [_module("a", Path("/x/a.py"), None), _module("a2", Path("/x/a.py"), None),
            SimpleNamespace(__spec__=SimpleNamespace(name="ext", origin="/x/ext.so", cached=None)),
            SimpleNamespace(__spec__=None), SimpleNamespace()]
    assert [name for name, _, _ in bytecode.python_sources(mods)] == ["a"]


def test_all_current_is_ok(tmp_path, monkeypatch):
    modules = _package(tmp_path, compiled=True)
    monkeypatch.setattr(bytecode, "loaded_modules", lambda: modules)
    f = bytecode.probe(ProbeContext(env={}, import_module=fake_import(torch=SimpleNamespace())))
    assert f.status == "ok" and f.fix is None
    assert f.measured["modules"] == 3 and f.measured["without_bytecode"] == 0 and f.measured["compile_s"] is None


def test_missing_bytecode_is_measured_and_fixed_with_compileall(tmp_path, monkeypatch):
    modules = _package(tmp_path)
    monkeypatch.setattr(bytecode, "loaded_modules", lambda: modules)
    monkeypatch.setattr(bytecode, "WARN_S", 0.0)  # three small files compile in milliseconds
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site")] + sys.path)
    ctx = ProbeContext(env={"PYTHONDONTWRITEBYTECODE": "1"}, import_module=fake_import(torch=SimpleNamespace()))
    f = bytecode.probe(ctx)
    assert f.status == "warn", f
    assert f.measured["without_bytecode"] == 3 and f.measured["packages"] == {"fakelib": 3}
    assert f.measured["compile_s"] > 0 and f.measured["compiled_files"] == 3
    assert "3 of 3 imported modules" in f.summary
    assert any("PYTHONDONTWRITEBYTECODE=1" in d for d in f.details)
    assert f" -m compileall -q -j 0 {tmp_path / 'site'} " in f.fix and "PYTHONPYCACHEPREFIX" not in f.fix
    # The fix works: after it, the probe finds the bytecode.
    for module in modules:
        py_compile.compile(module.__spec__.origin, cfile=module.__spec__.cached, doraise=True)
    assert bytecode.probe(ctx).status == "ok"


def test_read_only_packages_get_a_bytecode_prefix(tmp_path, monkeypatch):
    modules = _package(tmp_path)
    monkeypatch.setattr(bytecode, "loaded_modules", lambda: modules)
    monkeypatch.setattr(bytecode, "WARN_S", 0.0)
    monkeypatch.setattr(bytecode.os, "access", lambda path, mode: False)
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "flags", SimpleNamespace(dont_write_bytecode=False))
    f = bytecode.probe(ProbeContext(env={}, import_module=fake_import(torch=SimpleNamespace())))
    assert f.status == "warn" and any("read-only" in d for d in f.details)
    assert f.fix.startswith("export PYTHONPYCACHEPREFIX=") and "compileall" in f.fix


def test_a_small_cost_is_not_a_warning(tmp_path, monkeypatch):
    modules = _package(tmp_path, files=1)
    monkeypatch.setattr(bytecode, "loaded_modules", lambda: modules)
    f = bytecode.probe(ProbeContext(env={}, import_module=fake_import(torch=SimpleNamespace())))
    assert f.status == "ok" and f.measured["without_bytecode"] == 1 and f.measured["estimated_s"] < bytecode.WARN_S


def test_compile_budget_extrapolates_from_the_measured_rate(tmp_path, monkeypatch):
    modules = _package(tmp_path, files=4)
    monkeypatch.setattr(bytecode, "loaded_modules", lambda: modules)
    monkeypatch.setattr(bytecode, "COMPILE_BUDGET_S", 0.0)  # stop after the first file
    f = bytecode.probe(ProbeContext(env={}, import_module=fake_import(torch=SimpleNamespace())))
    assert f.measured["compiled_files"] == 1
    # Four files of one size: all of them cost four times the one compiled.
    assert f.measured["estimated_s"] == pytest.approx(4 * f.measured["compile_s"], rel=0.05, abs=0.001)
    assert any("compiling 1 of the files" in d for d in f.details)


def test_fix_also_compiles_site_packages_and_pythonpath(tmp_path):
    import site

    extra = tmp_path / "extra"
    extra.mkdir()
    ctx = ProbeContext(env={"PYTHONPATH": f"{extra}:{tmp_path / 'absent'}"})
    roots = bytecode.fix_roots([str(tmp_path)], ctx)
    assert roots[0] == str(tmp_path) and str(extra) in roots and str(tmp_path / "absent") not in roots
    assert all(p in roots for p in site.getsitepackages() if os.path.isdir(p))


def test_torch_that_does_not_import_is_a_skip():
    f = bytecode.probe(ProbeContext(env={}, import_module=fake_import(torch=ImportError("libcudnn.so.9"))))
    assert f.status == "skip" and "torch_build" in f.summary


def test_importlib_magic_matches_what_the_probe_compares():
    assert len(importlib.util.MAGIC_NUMBER) == 4
