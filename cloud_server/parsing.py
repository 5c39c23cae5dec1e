"""Request bytes parsed without raising: bytes that do not decode become an `Undecodable`.

grpcio answers a deserializer that raises with INTERNAL and logs a
traceback; with this sentinel the handler answers INVALID_ARGUMENT instead.
"""
from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import Message

from common.tensor_codec import clip


class Undecodable:
    """Stands in for a request whose bytes do not parse as its message type; says why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def lenient_parser(cls: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """A request deserializer for `cls` that never raises."""
    prefix = f"Error parsing message with type '{cls.DESCRIPTOR.full_name}': "

    def parse(data: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or anything else hostile bytes provoke
            reason = str(exc).removeprefix(prefix) or type(exc).__name__
            return Undecodable(f"could not decode {cls.DESCRIPTOR.name} ({len(data)} bytes): {clip(reason, 100)}")

    return parse
