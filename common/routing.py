"""How a call finds its replica: the gRPC metadata header load balancers hash on (docs/scaling.md)."""
from __future__ import annotations

# Every edge call carries it; HAProxy (deploy/haproxy.py) routes by a consistent hash of its value.
AFFINITY_HEADER = "x-dlora-affinity"


def affinity(client_key: str, federation: str | None) -> str:
    """A SplitLoRA client's federation name, so its members meet on one replica; else the client's own key."""
    return federation if federation is not None else client_key
