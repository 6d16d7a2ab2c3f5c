import time


def probe(ctx):
    time.sleep(600)
