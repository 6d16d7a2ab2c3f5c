from probes.finding import Finding


def probe(ctx):
    return Finding(id="settings_echo", status="ok", summary=f"{ctx.workload.width}x{ctx.workload.height}",
                   measured={"settings": ctx.settings()})
