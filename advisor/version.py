"""The tool's version: recorded in every manifest and report, part of every stage fingerprint."""

__version__ = "0.1.0"
