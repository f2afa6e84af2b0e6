"""The ingest stage: a raw request log -> requests.parquet + rejects.jsonl (stage.py; reader, formats, fields)."""
