"""The replay stage: a real vLLM engine confirms the prediction (stage.py; plan, engine, server, tinymodel)."""
