"""What the multi-GPU tests run in each torchrun rank (on the CPU, gloo): `python -m tests.parallel_ranks ...`.

    render OUT_DIR PROFILE...   render the tiny model once per profile (k=v,... text); rank 0 saves OUT_DIR/<i>.npy
                                (and OUT_DIR/<i>.cached: the steps a cache-dit cache reused)
    fail                        rank 0 waits in a collective, rank 1 raises: the launcher must stop both
    ulysses_graph OUT_DIR       qwendoctor's Ulysses attention compiled with fullgraph=True (no graph break
                                allowed) on uneven shares; each rank writes OUT_DIR/<rank>.err, its largest
                                difference from attention over the whole sequence in one process

On GPUs (tests/gpu) the ranks use CUDA and NCCL, and ulysses_graph compiles with inductor; elsewhere the CPU and
gloo, and ulysses_graph traces with aot_eager (no C++ compile).
"""

import sys

from qwendoctor import cli, parallel
from qwendoctor.levers import parallel as parallel_levers
from qwendoctor.capabilities import detect_capabilities
from qwendoctor.errors import QwendoctorError
from qwendoctor.profile import Profile, Workload

WORKLOAD = Workload(model="tiny", width=128, height=112, reference_steps=3, dtype="float32")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def render(out_dir: str, profiles: list[str]) -> None:
    import numpy as np

    from qwendoctor import runner  # diffusers: only where a model is built

    parallel.init_process_group(_device())
    for index, text in enumerate(profiles):
        profile = Profile.from_text(text)
        model = runner.build(WORKLOAD, profile, detect_capabilities())
        image = runner.render(model, WORKLOAD, profile, "a lighthouse at dusk", seed=3)
        if parallel.is_main():
            np.save(f"{out_dir}/{index}.npy", image)
            cached = _cached_steps(model.pipe)
            if cached is not None:
                with open(f"{out_dir}/{index}.cached", "w") as handle:
                    handle.write(str(cached))
            exchanges = _size_exchanges()
            if exchanges is not None:
                with open(f"{out_dir}/{index}.exchanges", "w") as handle:
                    handle.write(str(exchanges))
    parallel.destroy_process_group()


def _cached_steps(pipe) -> int | None:
    """Steps the render reused from a cache-dit cache (levers.cached_steps), if one was on."""
    from qwendoctor import levers

    return levers.cached_steps(pipe)


def _size_exchanges() -> int | None:
    """How many sequence-length exchanges Ulysses made (qwendoctor.levers.parallel.SizesOncePerForward), if it ran."""
    from diffusers.models import attention_dispatch

    sizes = attention_dispatch.gather_size_by_comm
    return sizes.exchanges if isinstance(sizes, parallel_levers.SizesOncePerForward) else None


def ulysses_graph(out_dir: str) -> None:
    from types import SimpleNamespace

    import torch
    from diffusers.models.attention_dispatch import _native_attention_forward_op

    device = _device()
    parallel.init_process_group(device)
    mesh = parallel_levers.device_mesh(Profile.from_text("parallel=ulysses,gpus=2"))
    text_tokens, image_tokens, heads, dim = 5, 8, 4, 8  # 5 = 3 + 2 and 8 = 4 + 4: shares of 7 and 6 tokens
    split = parallel_levers._ulysses_in_compiled_graphs(torch.nn.Linear(1, 1), mesh)
    split.before_pass(None, (), {"hidden_states": torch.zeros(1, image_tokens, 1),
                                 "encoder_hidden_states": torch.zeros(1, text_tokens, 1)})
    generator = torch.Generator().manual_seed(0)
    text, image = (torch.randn(3, 1, tokens, heads, dim, generator=generator) for tokens in (text_tokens, image_tokens))
    joint = torch.cat([text, image], dim=2)  # q, k, v over the whole sequence, as one process sees it
    whole = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in joint)).transpose(1, 2)
    rank = parallel.rank()
    mine = [torch.tensor_split(torch.arange(n), 2)[rank] for n in (text_tokens, image_tokens)]
    local = torch.cat([text[:, :, mine[0]], image[:, :, mine[1]]], dim=2)  # this rank's [text, image] share
    expected = torch.cat([whole[:, mine[0]], whole[:, text_tokens + mine[1]]], dim=1)
    config = SimpleNamespace(context_parallel_config=SimpleNamespace(
        ring_degree=1, ulysses_degree=2, _ulysses_mesh=mesh["ulysses"]))

    def attention(q, k, v):
        return parallel_levers.context_parallel_attention(q, k, v, None, 0.0, False, None, False, False,
                                                          _native_attention_forward_op, None,
                                                          _parallel_config=config)

    backend = "inductor" if device == "cuda" else "aot_eager"
    out = torch.compile(attention, fullgraph=True, backend=backend)(*(t.to(device) for t in local)).cpu()
    with open(f"{out_dir}/{rank}.err", "w") as handle:
        handle.write(str(float((out - expected).abs().max())))
    parallel.destroy_process_group()


def fail() -> None:
    import torch
    import torch.distributed as dist

    parallel.init_process_group("cpu")
    if parallel.rank() == 1:
        raise QwendoctorError("rank one gave up on purpose", exit_code=3)
    dist.all_reduce(torch.ones(1))  # never completes: its peer is gone


if __name__ == "__main__":
    try:
        {"render": lambda: render(sys.argv[2], sys.argv[3:]), "fail": fail,
         "ulysses_graph": lambda: ulysses_graph(sys.argv[2])}[sys.argv[1]]()
    except QwendoctorError as error:
        sys.exit(cli._fail(str(error), error.exit_code))
    except Exception as error:
        sys.exit(cli._fail(f"{type(error).__name__}: {error}", 1))
