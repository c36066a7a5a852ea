"""The core's errors: input it cannot serve, each with a message meant for the caller.

The HTTP layer maps each class to a status (``service/api/errors.py``); the offline commands print
the message. Nothing here knows about HTTP.
"""
from __future__ import annotations


class RecsysError(Exception):
    """A request the core refuses; ``message`` says why, for the caller."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UnknownId(RecsysError):
    """A user or item id that this bundle and its online state do not know."""


class InvalidInput(RecsysError):
    """Values the bundle cannot honour: an unknown genre or feature name, a non-numeric numeric feature."""


class Conflict(RecsysError):
    """A definition that clashes with what is already in force (two experiments setting one option)."""


class Unavailable(RecsysError):
    """An answer that needs the online state while it cannot be read: a user only the state store knows (not in
    the bundle) is neither served nor called unknown when the store does not answer. Retry."""
