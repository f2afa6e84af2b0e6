"""Errors a user can fix. Each message says what is wrong and what to do about it.

The CLI turns these into a message and an exit code; library code raises them
and never prints.
"""

from __future__ import annotations


class AdvisorError(Exception):
    """Base of every error the user can act on (exit code 1)."""

    exit_code = 1


class InputRefused(AdvisorError):
    """The input as a whole is not a log we read (binary, Parquet, JSON array, CSV).

    Nothing is written when this is raised (exit code 2).
    """

    exit_code = 2


class MissingStage(AdvisorError):
    """A stage needs an artifact that an earlier stage has not written yet."""
