def probe(ctx):
    # A probe that imports a package without guarding it, where the package's requirement is missing.
    import qdtest_nowhere_to_be_found  # noqa: F401
