def probe(ctx):
    raise RuntimeError("boom\nsecond line")
