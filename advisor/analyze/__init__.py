"""The analyze stage: shared prefixes, the ceiling, cache breakers, clusters (stage.py; prefixes, breakers, clusters, hashing)."""
