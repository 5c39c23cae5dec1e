"""One streamed call with an edge (a step, a forward, a generation): its messages, deadlines and replies.

The model's forward calls out to the edge from deep inside the blocks, so the
step runs in a worker thread and the call's handler relays what it sends. A
pump thread reads the edge's stream into a small inbox, so the worker can wait
for a message with a deadline.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import cast

import grpc

from cloud_server.errors import LaggedBehind, StepAbandoned, StepAborted, StepTimeout, status
from cloud_server.parsing import Undecodable
from cloud_server.session import Session, SessionManager, SessionNotFound
from common.tensor_codec import WireError, clip
from common.wire import dlora_pb2 as pb

log = logging.getLogger(__name__)

FIRST_MESSAGE_SECONDS = 10.0
GENERATION_TOKEN_SECONDS = 60.0   # the edge picks a token in milliseconds; an idle stream is abandoned
CLOSE_GRACE_SECONDS = 5.0        # how long a finished step waits for the edge to close its side of the stream
# Waits are cut in slices this long: an edge whose stream ended is noticed within one
# even if gRPC never ends the request iterator the pump reads.
_SLICE_SECONDS = 0.5
# Bounded: a client that floods the stream is held back by gRPC flow control
# instead of filling the server's memory.
_INBOX_SIZE = 2

_DONE = object()   # the step finished: the worker's last word
_EOF = object()    # the edge closed its side of the stream (or it broke)


class InFlight:
    """How many edge streams are running, for a shutdown to wait on."""

    def __init__(self) -> None:
        self._count = 0
        self._cond = threading.Condition()

    def __enter__(self) -> None:
        with self._cond:
            self._count += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every stream to end; True if they all did."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._count and time.monotonic() < end:
                self._cond.wait(timeout=end - time.monotonic())
            return self._count == 0


class EdgeStream:
    """The cloud's side of one streamed call: `serve(body)` runs `body(stream)` against the edge."""

    def __init__(self, requests: Iterator[pb.EdgeMessage | Undecodable], context: grpc.ServicerContext,
                 owner: str, sessions: SessionManager, step_timeout: float) -> None:
        self.owner = owner                    # the caller's identity
        self.session: Session | None = None   # the session the start message named, once it did
        self.step_timeout = step_timeout
        self._sessions = sessions
        self._requests = requests
        self._out: queue.Queue[object] = queue.Queue()   # replies, then _DONE or the step's exception
        self._inbox: queue.Queue[object] = queue.Queue(maxsize=_INBOX_SIZE)
        self._finished = threading.Event()
        self._request_closed = threading.Event()   # the edge closed its side of the stream (or it broke)
        self._gone = threading.Event()
        context.add_callback(self._gone.set)  # the RPC ended: cancelled by the edge, timed out, or done
        self._deadline = time.monotonic() + step_timeout
        self._opening = True                  # the next message received is the call's first

    # -- the step's side (worker thread) ---------------------------------------
    def start(self) -> tuple[Session, pb.StepStart]:
        """The opening start message, and the caller's session it names."""
        first = self.receive()
        if first.WhichOneof("kind") != "start":
            raise WireError("a step must begin with a start message")
        self.session = self._sessions.get(first.start.session_id, self.owner)
        return self.session, first.start

    def receive(self, within: float | None = None) -> pb.EdgeMessage:
        """The edge's next message. `within`: seconds this one exchange may take
        (a joint batch drops an edge that lags the others by more)."""
        opening, self._opening = self._opening, False
        item = self._next(opening, within)
        if item is _EOF:
            if opening:  # nothing started, nothing to clean up: a malformed call, not a vanished edge
                raise WireError("the stream ended before its start message")
            raise StepAborted("the edge closed the stream in the middle of a step")
        if isinstance(item, Undecodable):
            # Raised where the step waits for the message, so its usual clean-up runs.
            raise WireError(str(item))
        msg = cast(pb.EdgeMessage, item)
        if msg.WhichOneof("kind") == "abandon":
            # Raised where the step waits, like a failure: the step's tensors go, the session stays.
            raise StepAbandoned(clip(f"the edge abandoned the step: {msg.abandon.reason or 'no reason given'}"))
        return msg

    def send(self, msg: pb.CloudMessage) -> None:
        self._out.put(msg)

    def credit(self, seconds: float) -> None:
        """Push the step deadline back: time a joint batch spent waiting on *other* edges is not this edge's to pay."""
        self._deadline += seconds

    def extend_deadline(self) -> None:
        """Generation: each token gets its own (short) deadline."""
        self._deadline = time.monotonic() + min(self.step_timeout, GENERATION_TOKEN_SECONDS)

    def _next(self, opening: bool, within: float | None) -> object:
        # The opening message must come quickly: idle streams must not hold handler threads.
        limit = min(self._deadline, time.monotonic() + FIRST_MESSAGE_SECONDS) if opening else self._deadline
        lagging = within is not None and time.monotonic() + within < limit
        if within is not None and lagging:
            limit = time.monotonic() + within
        while True:
            try:
                return self._inbox.get(timeout=max(min(limit - time.monotonic(), _SLICE_SECONDS), 0.0))
            except queue.Empty:
                if self._gone.is_set() and self._inbox.empty():
                    raise StepAborted("the edge's stream ended in the middle of a step") from None
                if time.monotonic() >= limit:
                    break
        if lagging:
            raise LaggedBehind(f"this edge took more than {within:.0f} s to answer one exchange while "
                               "its step was batched with other edges' steps; it was dropped from the "
                               "batch and its steps now run alone (retry the step)")
        raise StepTimeout(f"the step did not finish within the server's step deadline of "
                          f"{self.step_timeout:.0f} s (or its first message within "
                          f"{FIRST_MESSAGE_SECONDS:.0f} s)")

    # -- the handler's side --------------------------------------------------------
    def serve(self, body: Callable[[EdgeStream], None]) -> Iterator[pb.CloudMessage]:
        """Run `body(self)` in a worker thread and yield what it sends. A failed step's
        StepFailed message is yielded, then its exception raised (errors.py answers it)."""
        try:
            threading.Thread(target=self._pump, name="dlora-pump", daemon=True).start()
            threading.Thread(target=self._work, args=(body,), name="dlora-step", daemon=True).start()
            while True:
                item = self._out.get()
                # The status goes once the edge has closed its side. gRPC resets a stream the client
                # still sends on after its trailers, and HAProxy 2.6 turns that reset into CANCELLED
                # towards the edge, at times before the last messages reach it.
                if item is _DONE:
                    self._request_closed.wait(CLOSE_GRACE_SECONDS)
                    return
                if isinstance(item, BaseException):
                    code, detail = status(item)
                    # (A failed step's status does not wait: StepFailed already carries it.)
                    yield pb.CloudMessage(failed=pb.StepFailed(code=code.value[0], detail=detail))
                    try:
                        raise item
                    finally:
                        del item  # the exception's frames hold the step's graph: no reference left here
                yield cast(pb.CloudMessage, item)
        finally:
            self._finished.set()

    def _offer(self, item: object) -> bool:
        """Put into the bounded inbox, giving up once the step is over."""
        while not self._finished.is_set():
            try:
                self._inbox.put(item, timeout=_SLICE_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self) -> None:
        try:
            for msg in self._requests:
                if not self._offer(msg):
                    return
        except Exception:  # noqa: BLE001 - a cancelled stream ends like a closed one
            pass
        self._request_closed.set()
        self._offer(_EOF)

    def _work(self, body: Callable[[EdgeStream], None]) -> None:
        try:
            body(self)
            self._out.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - reported to the edge as a status
            self._report(exc)
            self._out.put(exc)

    def _report(self, exc: BaseException) -> None:
        """Log a failed step; an edge that vanished mid-step has its session freed."""
        code, detail = status(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("step failed")
        elif isinstance(exc, StepAbandoned):
            log.info("session %s: %s; its step is freed", self.session.id[:8] if self.session else "?", detail)
        else:
            log.warning("step refused (%s): %s", code.name, detail)
        if isinstance(exc, StepAborted) and self.session is not None:
            # The edge vanished mid-step: free what its session holds.
            try:
                self._sessions.close(self.session.id, self.owner, reason="closed: its edge vanished mid-step",
                                     by_edge=False)
            except SessionNotFound:
                pass
