"""The recommend stage: the vLLM flags to run, with the evidence (stage.py; options, view, rank, serve, constraints, fixes)."""
