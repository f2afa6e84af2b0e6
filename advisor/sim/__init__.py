"""The simulate stage: vLLM's prefix cache over a grid of configurations (stage.py, grid, configuration; the readable references cache and events; their compiled twins in fast/)."""
