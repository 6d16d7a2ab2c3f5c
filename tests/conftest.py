import logging
import os

import pytest

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
logging.getLogger("torchao").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_model():
    """One tiny pipeline for tests that only read it; tests that change it build their own."""
    from qwendoctor import models

    return models.load_model("tiny", "cpu", "float32")


@pytest.fixture
def tiny_workload():
    from qwendoctor.profile import Workload

    # 4 reference steps keep a render around 50 ms on two cores.
    return Workload(model="tiny", width=128, height=128, reference_steps=4, dtype="float32").validate()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENDOCTOR_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def recorded_compiles(monkeypatch):
    """torch.compile replaced by a recorder: the wiring is tested on the CPU, real compilation in tests/gpu
    (inductor on the CPU takes ~50 s for the tiny model and its complex-valued rotary code is not its target)."""
    import torch

    calls = []

    def fake_compile(function=None, **options):
        calls.append(options)
        return function

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls
