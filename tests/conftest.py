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
