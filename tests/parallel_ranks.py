"""What the multi-GPU tests run in each torchrun rank (on the CPU, gloo): `python -m tests.parallel_ranks ...`.

    render OUT_DIR PROFILE...   render the tiny model once per profile (k=v,... text); rank 0 saves OUT_DIR/<i>.npy
    fail                        rank 0 waits in a collective, rank 1 raises: the launcher must stop both
"""

import sys

from qwendoctor import cli, parallel
from qwendoctor.errors import QwendoctorError
from qwendoctor.profile import Profile, Workload

WORKLOAD = Workload(model="tiny", width=128, height=112, reference_steps=3, dtype="float32")


def render(out_dir: str, profiles: list[str]) -> None:
    import numpy as np

    from qwendoctor import runner  # diffusers: only where a model is built

    parallel.init_process_group("cpu")
    for index, text in enumerate(profiles):
        profile = Profile.from_text(text)
        model = runner.build(WORKLOAD, profile, runner.detect_capabilities())
        image = runner.render(model, WORKLOAD, profile, "a lighthouse at dusk", seed=3)
        if parallel.is_main():
            np.save(f"{out_dir}/{index}.npy", image)
            exchanges = _size_exchanges()
            if exchanges is not None:
                with open(f"{out_dir}/{index}.exchanges", "w") as handle:
                    handle.write(str(exchanges))
    parallel.destroy_process_group()


def _size_exchanges() -> int | None:
    """How many sequence-length exchanges Ulysses made (qwendoctor.parallel.SizesOncePerForward), if it ran."""
    from diffusers.models import attention_dispatch

    sizes = attention_dispatch.gather_size_by_comm
    return sizes.exchanges if isinstance(sizes, parallel.SizesOncePerForward) else None


def fail() -> None:
    import torch
    import torch.distributed as dist

    parallel.init_process_group("cpu")
    if parallel.rank() == 1:
        raise QwendoctorError("rank one gave up on purpose", exit_code=3)
    dist.all_reduce(torch.ones(1))  # never completes: its peer is gone


if __name__ == "__main__":
    try:
        {"render": lambda: render(sys.argv[2], sys.argv[3:]), "fail": fail}[sys.argv[1]]()
    except QwendoctorError as error:
        sys.exit(cli._fail(str(error), error.exit_code))
    except Exception as error:
        sys.exit(cli._fail(f"{type(error).__name__}: {error}", 1))
