"""Network addresses as both sides judge them: whether a bind address is loopback (only loopback may go
without TLS on the cloud, or without an API key on the device's OpenAI endpoint)."""
from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
