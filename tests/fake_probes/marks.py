import os

from probes.context import mark
from probes.finding import Finding


def probe(ctx):
    # A phase mark from inside a probe, for the trace test.
    mark("fake.phase", detail="inside")
    return Finding(id="marks", status="ok", summary="marked", measured={"pid": os.getpid()})
