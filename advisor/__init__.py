"""pc-advise: workload analysis and tuning advisor for vLLM prefix caching."""

__version__ = "0.1.0"
