import os
import time
from pathlib import Path

from probes.finding import Finding


def probe(ctx):
    # Asks for the GPU, then holds it for GPU_WINDOW_S seconds; touches $QWENDOCTOR_TEST_MARK while it does.
    ctx.use_gpu()
    started = time.time()
    mark = os.environ.get("QWENDOCTOR_TEST_MARK")
    if mark:
        Path(mark).write_text("on the GPU")
    time.sleep(float(os.environ.get("GPU_WINDOW_S", "1.0")))
    return Finding(id="gpu_window", status="ok", summary="held the GPU",
                   measured={"pid": os.getpid(), "started": started, "ended": time.time()})
