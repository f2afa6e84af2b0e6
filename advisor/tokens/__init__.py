"""The tokenize stage: requests -> the token ids vLLM's server would cache (stage.py; chatprompt, default_tokenizer)."""
