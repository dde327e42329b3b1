"""Exceptions of the library; the edges (gateway, CLI) map them to status codes and text.

Messages name ids, fields and reasons, never patient data.
"""

from __future__ import annotations


class PmlError(Exception):
    """Base class of every error pml raises on purpose.

    ``code`` is the status name every interface uses for it (gRPC code, HTTP status, audit
    outcome), so the mapping lives in one place.
    """

    code = "INTERNAL"


class NotFound(PmlError):
    """The object does not exist in the caller's account (or in no account at all)."""

    code = "NOT_FOUND"


class InvalidArgument(PmlError):
    """Input is malformed; ``violations`` lists ``(field path, reason)`` pairs."""

    code = "INVALID_ARGUMENT"

    def __init__(self, violations: list[tuple[str, str]]):
        self.violations = violations
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in violations))


def require_id(field: str, value: str) -> None:
    """An empty id is a malformed request, not a lookup that found nothing."""
    if not value:
        raise InvalidArgument([(field, "required")])


class AlreadyExists(PmlError):
    """An object with that id exists already."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(PmlError):
    """The object is not in a state that allows the call (e.g. approving a failed run)."""

    code = "FAILED_PRECONDITION"


class Unauthenticated(PmlError):
    """No or unknown credentials."""

    code = "UNAUTHENTICATED"


class PermissionDenied(PmlError):
    """Known credentials that may not make this call."""

    code = "PERMISSION_DENIED"


class StepFailed(PmlError):
    """A run step cannot succeed; the run fails with this reason (a person can act on it)."""

    code = "FAILED_PRECONDITION"


class ImageNotFound(StepFailed):
    """An image URI that the image registry cannot resolve."""


class PortInUse(RuntimeError):
    """A server (gRPC gateway, HTTP API) could not bind its address; not an API error."""
