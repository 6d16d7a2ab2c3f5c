import time

from probes.finding import Finding


def probe(ctx):
    time.sleep(0.5)
    return Finding(id="slow", status="warn", summary="slow but fine", fix="be patient")
