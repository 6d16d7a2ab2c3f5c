import os
import time
from pathlib import Path

from probes.finding import Finding


def probe(ctx):
    # Waits (up to 60 s) for the file another probe writes while it holds the GPU, then asks for the GPU itself.
    mark = Path(os.environ["QWENDOCTOR_TEST_MARK"])
    until = time.time() + 60
    while not mark.exists() and time.time() < until:
        time.sleep(0.05)
    saw = mark.exists()
    if os.environ.get("WAITS_THEN_USES_GPU"):
        ctx.use_gpu()
    return Finding(id="waits_for_mark", status="ok", summary="waited",
                   measured={"saw_mark": saw, "on_gpu": time.time()})
