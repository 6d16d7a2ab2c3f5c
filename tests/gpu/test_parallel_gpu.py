"""Multi-GPU generation on real GPUs (NCCL): skipped with fewer than two visible."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qwendoctor import parallel, runner
from qwendoctor.capabilities import detect_capabilities
from qwendoctor.profile import Profile

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@pytest.fixture
def ranks_import_tests(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.chdir(REPO)


def test_ulysses_attention_compiles_into_one_inductor_graph_over_nccl(ranks_import_tests, tmp_path):
    parallel.launch(2, ["tests.parallel_ranks", "ulysses_graph", str(tmp_path)])
    errors = [float((tmp_path / f"{rank}.err").read_text()) for rank in (0, 1)]
    assert max(errors) < 1e-3, errors  # float32; TF32 off, SDPA's kernels against one process's


@pytest.mark.parametrize("profile", ["parallel=ulysses,gpus=2,compile=regional", "parallel=cfg,gpus=2"])
def test_two_gpu_render_matches_one_gpu(ranks_import_tests, tmp_path, profile):
    from tests import parallel_ranks

    parallel.launch(2, ["tests.parallel_ranks", "render", str(tmp_path), profile])
    workload = parallel_ranks.WORKLOAD
    model = runner.build(workload, Profile(), detect_capabilities())
    alone = runner.render(model, workload, Profile(), "a lighthouse at dusk", seed=3)
    assert np.abs(np.load(tmp_path / "0.npy") - alone).max() < 2e-3
    if "ulysses" in profile:  # every attention call took qwendoctor's path: no length exchange at all
        assert int((tmp_path / "0.exchanges").read_text()) == 0
