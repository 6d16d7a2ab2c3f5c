from probes.finding import Finding


def probe(ctx):
    return Finding(id="failing", status="fail", summary="it failed", details=["why it failed"], fix="do X")
