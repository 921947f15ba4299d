"""User-facing errors.

Every problem the user can fix (bad option, missing model, unreadable data, singular Hessian)
is raised as :class:`LlmpruneError`; the CLI prints its message on one line without a
traceback. Anything else is a bug and keeps its traceback.
"""


class LlmpruneError(Exception):
    """An error caused by the input, with a message that says how to fix it."""


class Cancelled(LlmpruneError):
    """The caller asked the run to stop (checked between decoder layers)."""
