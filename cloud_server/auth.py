"""Who is calling: per-client bearer tokens and TLS client certificates.

Every RPC names its caller through `identify`. Sessions are bound to the
identity that opened them, so one client can never read or drive another's
session, even with its id in hand.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

import grpc


class Unauthenticated(Exception):
    pass


ANONYMOUS = "anonymous"


def load_tokens(path: Path) -> dict[str, str]:
    """Token file: one `CLIENT_ID TOKEN` per line; '#' starts a comment. Returns token -> client id."""
    tokens: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'CLIENT_ID TOKEN'")
        client, token = parts
        if len(token) < 16:
            raise ValueError(f"{path}:{n}: token of {client!r} is shorter than 16 characters")
        if token in tokens:
            raise ValueError(f"{path}:{n}: token of {client!r} is already used by {tokens[token]!r}")
        tokens[token] = client
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


@dataclass
class Authenticator:
    tokens: dict[str, str] = field(default_factory=dict)  # token -> client id; empty: no token check
    mtls: bool = False

    def identify(self, context: grpc.ServicerContext) -> str:
        """The caller's identity, or Unauthenticated."""
        cert_name = self._cert_name(context) if self.mtls else None
        if not self.tokens:
            return f"cert:{cert_name}" if cert_name else ANONYMOUS
        meta = dict(context.invocation_metadata() or ())
        header = meta.get("authorization", "")
        if not header:
            raise Unauthenticated("this server needs a token: pass --token (or DLORA_TOKEN) to the edge")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("malformed authorization header; expected 'Bearer TOKEN'")
        # Compare against every token in constant time, so timing reveals nothing.
        client = None
        for known, who in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                client = who
        if client is None:
            raise Unauthenticated("invalid token")
        return f"{client}@{cert_name}" if cert_name else client

    @staticmethod
    def _cert_name(context: grpc.ServicerContext) -> str | None:
        auth = context.auth_context() or {}
        names = auth.get("x509_common_name") or auth.get("x509_subject_alternative_name") or []
        return names[0].decode() if names else None


