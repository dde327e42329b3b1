"""pml errors → gRPC status codes with details (google.rpc.BadRequest for bad fields)."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from pml.errors import InvalidArgument, PmlError

log = logging.getLogger(__name__)

def to_status(exc: PmlError) -> grpc.Status:
    code = code_pb2.Code.Value(exc.code)
    status = status_pb2.Status(code=code, message=str(exc))
    if isinstance(exc, InvalidArgument):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=reason)
                    for field, reason in exc.violations
                ]
            )
        )
        status.details.append(detail)
    return rpc_status.to_status(status)


F = TypeVar("F", bound=Callable[..., Any])


def _internal(context: grpc.ServicerContext, method: str) -> None:
    """Anything else is a bug: log it here, answer INTERNAL with no details (they could
    carry SQL parameters or record content)."""
    log.exception("unexpected error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, "internal error; the gateway's log has the details")


def grpc_errors(method: F) -> F:
    """Abort the call with the mapped status when an error escapes a unary handler."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except PmlError as exc:
            context.abort_with_status(to_status(exc))
        except Exception:
            if context.code() is not None:  # already aborted
                raise
            _internal(context, method.__name__)

    return wrapper  # type: ignore[return-value]


def grpc_stream_errors(method: F) -> F:
    """The same for server-streaming handlers."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from method(self, request, context)
        except PmlError as exc:
            context.abort_with_status(to_status(exc))
        except Exception:
            if context.code() is not None:
                raise
            _internal(context, method.__name__)

    return wrapper  # type: ignore[return-value]
