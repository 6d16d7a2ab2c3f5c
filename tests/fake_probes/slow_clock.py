import os
import time

from probes.finding import Finding


def probe(ctx):
    time.sleep(1.0)
    return Finding(id="slow_clock", status="ok", summary="slept", measured={"pid": os.getpid(), "ended": time.time()})
