"""Sessions: one per connected edge, isolated from each other."""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from cloud_server.federation import Federation
from common.malloc_tuning import release_memory
from common.site_types import SiteSpec
from common.wire_format import WireFormat

log = logging.getLogger(__name__)


# A session that stepped this recently is taken to be training and about to step again.
RECENT_SECONDS = 10.0


class SessionError(Exception):
    """Base of the session errors; errors.py maps each to its gRPC status."""


class SessionNotFound(SessionError):
    pass


class SessionBusy(SessionError):
    pass


class StepOutOfOrder(SessionError):
    pass


class TooManySessions(SessionError):
    pass


@dataclass
class Session:
    id: str
    owner: str                # identity that opened it; only it may use the session
    client_name: str
    sites: list[SiteSpec]
    wire: WireFormat
    opened_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    last_step_id: int = -1
    steps: int = 0
    forwards: int = 0
    tokens: int = 0
    cloud_seconds: float = 0.0
    # Killed ("parked") adapters the cloud applies frozen, by module name.
    parked: dict[str, nn.Module] = field(default_factory=dict)
    closed: bool = False
    # DLoRA: blocks [0, edge_layers) and their adapters run on the edge (0: none).
    edge_layers: int = 0
    # SplitLoRA: blocks [0, cut_layer) run on the edge; the federation holds the server-side adapters.
    cut_layer: int = 0
    federation: Federation | None = None   # SplitLoRA: the federation the session joined
    # The key the edge keeps across re-opened sessions (a federation knows its members by it).
    client_key: str = ""
    # Run once it is closed, told whether its edge closed it (CloseSession) or the server did (the edge
    # vanished, it sat idle, the server shut down): only the first means the edge is done with it.
    on_close: list[Callable[[bool], None]] = field(default_factory=list)
    solo: bool = False                # lagged behind a joint batch once: its steps run alone
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # A pipelined step's parts (calls of one step id, in flight at once) share `_lock`: the first takes it,
    # the last to leave gives it back. (step id, parts, train) of the step holding it, its parts in, done.
    _group: tuple[int, int, bool] | None = None
    _parts_in: int = 0
    _parts_done: set[int] = field(default_factory=set)
    _group_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def blocks_on_edge(self) -> int:
        """The first block this cloud runs for the session: its SplitLoRA cut layer or its DLoRA edge layers."""
        return self.cut_layer if self.federation is not None else self.edge_layers

    @property
    def module_names(self) -> set[str]:
        return {m.name for s in self.sites for m in s.modules}

    def live_sites(self) -> int:
        """Sites that cost a round trip: those of the cloud's blocks with a module still live."""
        return sum(any(m.name not in self.parked for m in s.modules) for s in self.sites
                   if s.layer >= self.blocks_on_edge)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the session between steps (parking changes what a step computes)."""
        if not self._lock.acquire(blocking=False):
            raise SessionBusy(f"session {self.id[:8]} is running a step; change parked adapters between steps")
        try:
            if self.closed:
                raise SessionNotFound(f"session {self.id[:8]} was closed")
            yield
        finally:
            self._lock.release()

    @contextmanager
    def step(self, step_id: int, train: bool, part: int = 0, parts: int = 1) -> Iterator[None]:
        """Runs one step at a time; a training step id must be new. A pipelined step's `parts` calls (the
        same id, each its `part`) run at once, as one step: it completes when every part has."""
        self._enter(step_id, train, parts)
        try:
            if self.closed:
                raise SessionNotFound(f"session {self.id[:8]} was closed")
            # The last completed id may be replayed (its reply was lost on the way
            # back; the cloud keeps no per-step state to apply twice). Older ids
            # come from a confused or duplicated client and are refused.
            if train and step_id < self.last_step_id:
                raise StepOutOfOrder(
                    f"step id {step_id} is older than the last completed step {self.last_step_id}; "
                    "training step ids must not go back"
                )
            self.last_used = time.monotonic()
            yield
            if self._completes(part, parts):
                # Only a completed step consumes its id, so a failed step can be retried.
                if train:
                    if step_id > self.last_step_id:
                        self.steps += 1
                    self.last_step_id = step_id
                else:
                    self.forwards += 1
        finally:
            self.last_used = time.monotonic()
            self._leave(parts)

    def _enter(self, step_id: int, train: bool, parts: int) -> None:
        busy = SessionBusy(f"session {self.id[:8]} is already running a step; steps of one session run one at "
                           "a time (a pipelined step's parts together)")
        if parts <= 1:
            if not self._lock.acquire(blocking=False):
                raise busy
            return
        with self._group_lock:
            if self._group == (step_id, parts, train) and self._parts_in:
                self._parts_in += 1          # another part of the step that holds the session
                return
            if not self._lock.acquire(blocking=False):
                raise busy
            self._group, self._parts_in, self._parts_done = (step_id, parts, train), 1, set()

    def _completes(self, part: int, parts: int) -> bool:
        """Whether this part's end completes its step (always, unpipelined)."""
        if parts <= 1:
            return True
        with self._group_lock:
            self._parts_done.add(part)
            return len(self._parts_done) == parts

    def _leave(self, parts: int) -> None:
        if parts <= 1:
            self._lock.release()
            return
        with self._group_lock:
            self._parts_in -= 1
            if self._parts_in == 0:
                self._group = None
                self._lock.release()


class SessionManager:
    def __init__(self, max_sessions: int, per_client: int = 0) -> None:
        self.max_sessions = max_sessions
        self.per_client = per_client      # most sessions one identity may hold; 0: no limit of its own
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, owner: str, client_name: str, sites: list[SiteSpec], wire: WireFormat,
             prepare: Callable[[Session], None] | None = None, client_key: str = "") -> Session:
        """A new session; `prepare(session)` runs before it becomes visible (and may refuse it)."""
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise TooManySessions(
                    f"the server holds its maximum of {self.max_sessions} sessions; try again later"
                )
            held = sum(1 for s in self._sessions.values() if s.owner == owner)
            if self.per_client and held >= self.per_client:
                raise TooManySessions(
                    f"this client already holds {held} sessions, the most one client may hold on this server; "
                    "close one first"
                )
            # 128 random bits: a session id cannot be guessed.
            sid = secrets.token_hex(16)
            session = Session(sid, owner, client_name or "anonymous", sites, wire, client_key=client_key or sid)
            if prepare is not None:
                prepare(session)
            self._sessions[session.id] = session
        log.info("session %s opened by %r: %d sites, wire %s (%d open)",
                 session.id[:8], session.client_name, len(sites), wire,
                 len(self._sessions))
        return session

    def get(self, session_id: str, owner: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        # Someone else's session answers exactly like a missing one: ids reveal nothing.
        if session is None or session.owner != owner:
            raise SessionNotFound(f"unknown session id {session_id[:16]!r}; open a session first")
        return session

    def close(self, session_id: str, owner: str, reason: str = "closed by the edge", by_edge: bool = True) -> Session:
        session = self.get(session_id, owner)
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise SessionNotFound(f"unknown session id {session_id[:16]!r}")
        session.closed = True
        # Wait for a running step to end before dropping what it uses (a vanished
        # edge's step fails fast; a live step is bounded by the step deadline).
        with session._lock:
            session.parked.clear()
        for hook in session.on_close:
            hook(by_edge)
        release_memory()
        secs = time.monotonic() - session.opened_at
        log.info("session %s of %r %s: %d steps, %d forwards, %d tokens in %.1fs (%.0f tokens/s), "
                 "cloud compute %.1fs; %d open",
                 session.id[:8], session.client_name, reason, session.steps, session.forwards, session.tokens,
                 secs, session.tokens / max(secs, 1e-9), session.cloud_seconds, len(self._sessions))
        return session

    def reap_idle(self, idle_seconds: float) -> list[str]:
        """Close sessions unused for idle_seconds (never one in the middle of a step)."""
        now = time.monotonic()
        with self._lock:
            stale = [s for s in self._sessions.values()
                     if now - s.last_used > idle_seconds and not s._lock.locked()]
        closed = []
        for s in stale:
            try:
                self.close(s.id, s.owner, reason=f"closed after {idle_seconds:.0f}s idle", by_edge=False)
                closed.append(s.id)
            except SessionNotFound:
                pass
        return closed

    def close_all(self, reason: str) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            try:
                self.close(s.id, s.owner, reason=reason, by_edge=False)
            except SessionNotFound:
                pass

    def open_by_mode(self) -> dict[str, int]:
        """Sessions open now, by training mode (DLoRA, edge layers included, or SplitLoRA)."""
        with self._lock:
            sessions = list(self._sessions.values())
        split = sum(1 for s in sessions if s.federation is not None)
        return {"dlora": len(sessions) - split, "splitlora": split}

    def between_steps(self, recent: float = RECENT_SECONDS) -> int:
        """DLoRA sessions used in the last `recent` seconds that are not running a
        step now: the ones whose next step may arrive any moment (batching waits for them)."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for s in self._sessions.values()
                       if s.federation is None and not s._lock.locked() and now - s.last_used < recent)

    def __len__(self) -> int:
        return len(self._sessions)
