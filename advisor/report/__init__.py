"""The report stage (advisor.report.stage): report.html and report.md from the run folder."""
