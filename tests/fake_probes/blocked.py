from probes.finding import Finding


def probe(ctx):
    # What probes.imports.blocked returns for a probe whose package does not import.
    return Finding(id="blocked", status="skip", summary="blocked: diffusers does not import: no module named 'x'",
                   fix="python -m pip install x", measured={"blocked_by": "imports", "missing": "x"})
