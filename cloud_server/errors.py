"""The errors a call ends with, and the one place each becomes its gRPC status.

Handlers raise; `answers_errors` (applied to every handler in server.py)
answers the call with the exception's status. Exceptions raised elsewhere
(sessions, federations, authentication, the wire codec) are mapped here too.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cloud_server.attestation import EvidenceError
from cloud_server.auth import Unauthenticated
from cloud_server.federation import FederationClosed, FederationMismatch
from cloud_server.federation_state import StateError
from cloud_server.session import SessionBusy, SessionNotFound, StepOutOfOrder, TooManySessions
from common.tensor_codec import WireError, clip


class LimitExceeded(Exception):
    """A request is larger than this server allows (tokens per step, the model's positions)."""


class StepTimeout(Exception):
    """A step waited on its edge, or on its federation, past the step deadline."""


class LaggedBehind(StepTimeout):
    """An edge answered too slowly for the joint batch it was in."""


class Draining(Exception):
    """The server is shutting down and takes no new work."""


class WrongMode(Exception):
    """The call does not fit the session's mode (or the server's)."""


class NotAttested(Exception):
    """Attest was called on a server that runs without attestation."""


class StepAborted(Exception):
    """The edge closed the stream or broke the protocol; the message says how."""


class StepAbandoned(Exception):
    """The edge said it gives up on this step (StepAbandon); its session stays open."""


# The first class an exception is an instance of decides, so subclasses come before their bases
# (WireError before ValueError). Anything else is INTERNAL.
STATUSES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (SessionBusy, grpc.StatusCode.FAILED_PRECONDITION),
    (StepOutOfOrder, grpc.StatusCode.ALREADY_EXISTS),
    (TooManySessions, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StepTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Draining, grpc.StatusCode.UNAVAILABLE),
    (FederationClosed, grpc.StatusCode.UNAVAILABLE),
    (WrongMode, grpc.StatusCode.FAILED_PRECONDITION),
    (NotAttested, grpc.StatusCode.FAILED_PRECONDITION),
    (EvidenceError, grpc.StatusCode.UNAVAILABLE),
    (FederationMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (StateError, grpc.StatusCode.FAILED_PRECONDITION),
    (WireError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (StepAborted, grpc.StatusCode.CANCELLED),
    (StepAbandoned, grpc.StatusCode.CANCELLED),
]


def status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a call that failed with `exc` answers with."""
    # Clipped: messages may quote the client's input, and trailers over 16 KiB
    # reach the client as RESOURCE_EXHAUSTED instead of this status.
    for cls, code in STATUSES:
        if isinstance(exc, cls):
            return code, clip(str(exc))
    return grpc.StatusCode.INTERNAL, clip(f"internal error: {type(exc).__name__}: {exc}")


Handler = Callable[[Any, grpc.ServicerContext], Any]


def answers_errors(behavior: Handler,
                   on_error: Callable[[grpc.StatusCode], object] | None = None) -> Handler:
    """`behavior` (a gRPC method's handler), answering whatever it raises with that exception's status
    (and telling `on_error` the status, for the metrics).

    A handler that returns an iterator streams its replies; what it raises while
    streaming is answered the same way, after the replies it yielded.
    """
    @functools.wraps(behavior)
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            result = behavior(request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            code, detail = status(exc)
        else:
            return _replies(result, context, on_error) if isinstance(result, Iterator) else result
        if on_error is not None:
            on_error(code)
        # Aborted outside the except clause: the exception (and a step graph its frames hold) goes first.
        context.abort(code, detail)

    return handle


def _replies(replies: Iterator[Any], context: grpc.ServicerContext,
             on_error: Callable[[grpc.StatusCode], object] | None) -> Iterator[Any]:
    try:
        yield from replies
        return
    except Exception as exc:  # noqa: BLE001 - every failure becomes a status
        code, detail = status(exc)
    if on_error is not None:
        on_error(code)
    context.abort(code, detail)
