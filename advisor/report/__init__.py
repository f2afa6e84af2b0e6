"""The report stage: report.html and report.md from the run folder (stage.py; model, facts, html, markdown, plots)."""
