"""The line cloud_server prints on stdout once it accepts connections, and its parsing by launchers."""
from __future__ import annotations

PREFIX = "DLoRA cloud server listening on "


def line(host: str, port: int) -> str:
    """The ready line for a server listening on host:port."""
    return f"{PREFIX}{host}:{port}"


def parse(text: str) -> str | None:
    """The HOST:PORT of a ready line; None for any other line of the server's output."""
    if not text.startswith(PREFIX):
        return None
    return text[len(PREFIX):].strip()
