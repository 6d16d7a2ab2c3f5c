"""CUDA graphs (compile_mode = reduce-overhead) on the GPU: the failure recorded on an H100 under regional compile
is reproduced (the explanation levers.CUDA_GRAPHS follows: each block call is a new CUDA-graph iteration), and the
combination the lever allows, the whole transformer compiled with CFG batching, replays graphs and draws the eager
image.
Speed is the bench's (row `stack:+cuda_graphs`), never asserted here."""

import numpy as np
import pytest
import torch

from qwendoctor import levers, models, runner
from qwendoctor.profile import Profile, Workload

PROMPT = "a red fox in the snow"
WORKLOAD = Workload(model="tiny", width=128, height=128, reference_steps=4, dtype="bfloat16")


def _psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _graph_launches(run) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as recorded:
        run()
        torch.cuda.synchronize()
    return sum(event.name == "cudaGraphLaunch" for event in recorded.events())


def test_regional_compile_with_cuda_graphs_overwrites_a_blocks_output():
    """What the lever refuses, done by hand: the error the H100 run recorded."""
    model = models.load_model("tiny", "cuda", "bfloat16")
    levers.optimize(model.pipe, Profile(cfg_batching=True), workload=WORKLOAD)
    model.pipe.transformer.compile_repeated_blocks(fullgraph=True, mode="reduce-overhead")
    with pytest.raises(RuntimeError, match="overwritten by a subsequent run"):
        for _ in range(3):  # warm-up, recording, replay
            runner.render(model, WORKLOAD, Profile(cfg_batching=True), PROMPT, 0)


def test_the_whole_transformer_as_cuda_graphs_replays_and_draws_the_eager_image():
    expected = runner.render(models.load_model("tiny", "cuda", "bfloat16"), WORKLOAD, Profile(), PROMPT, 0)
    profile = Profile(compile="full", compile_mode="reduce-overhead", cfg_batching=True)
    model = models.load_model("tiny", "cuda", "bfloat16")
    levers.optimize(model.pipe, profile, workload=WORKLOAD)
    for _ in range(2):  # warm-up and recording
        runner.render(model, WORKLOAD, profile, PROMPT, 0)
    images = []
    launches = _graph_launches(lambda: images.append(runner.render(model, WORKLOAD, profile, PROMPT, 0)))
    print(f"cudaGraphLaunch calls in one 4-step render: {launches}; PSNR vs eager {_psnr(images[0], expected):.1f}")
    assert launches >= WORKLOAD.reference_steps
    assert _psnr(images[0], expected) > 35
