"""The errors ltr raises for a user: each message names the problem and the fix."""

from __future__ import annotations


class LtrError(Exception):
    """A user-facing error: the message names the problem and the fix."""


class DataError(LtrError):
    """The dataset files are missing, broken, or the request does not make sense."""


class TimeLimitReached(LtrError):
    """The time limit (LTR_DEADLINE) passed: the run stopped at an epoch boundary, its checkpoint kept."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; its last checkpoint is kept, so the same command resumes it."""
