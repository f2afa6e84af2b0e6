"""The analyze stage: shared prefixes, the ceiling, cache breakers, reuse groups (stage.py; prefixes, breakers, reuse, clusters, hashing)."""
