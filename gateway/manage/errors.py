"""The service layer's refusals: each is an answer for the user, worded as they should read it.

The CLI prints the message; the admin API maps each class to a status
(:mod:`gateway.admin.problems`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from ..keys import looks_like_key_id


class ServiceError(Exception):
    """A management action was refused; the message is for the user as it is."""


class NotFound(ServiceError):
    pass


def no_such_key(key_id: str) -> NotFound:
    """The answer for a key that does not exist, and for one in another org's keeping.

    SECURITY: one answer for both, so an org never learns which ids another holds.
    """
    # SECURITY: echo the argument only when it has an id's shape: whatever
    # else it is (a mistyped full key?) may hold a secret.
    shown = repr(key_id) if looks_like_key_id(key_id) else "given"
    return NotFound(f"no key with the id {shown}")


class Forbidden(ServiceError):
    """The acting admin key may not do this: another org, a kind it may not manage, a wider key than its own."""


class FieldProblem(NamedTuple):
    """One problem with an action's input: the parameter it is about, or None for the input as a whole."""

    field: str | None  # "org", or "operations.1" for an item of a list
    message: str


class InvalidInput(ServiceError):
    """Input the service refuses. ``problems`` lists every one found; the message is the first's.

    A refusal made after the input's form was checked (no such role, not a member, ...) has one
    problem about the input as a whole.
    """

    def __init__(self, message: str, *, problems: Sequence[FieldProblem] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems) or (FieldProblem(None, message),)


class ConflictError(ServiceError):
    pass


class Replayed(ServiceError):
    """The token was exchanged before: a token is exchanged once."""
