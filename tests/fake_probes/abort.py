import os


def probe(ctx):
    os.abort()  # what a native library does on a fatal error: SIGABRT
