"""Attest a cloud before anything else goes to it: learn the TLS key it serves, ask for evidence, check it.

The edge first reads the certificate of the server it reaches with a bare TLS handshake (nothing is sent
but the handshake), then opens a gRPC channel that trusts exactly that certificate, asks for evidence bound
to a fresh nonce and that certificate's key, and checks it. Every later channel of the session pins the
same certificate: a connection that lands anywhere else (a relay, another replica after a failover) fails
its handshake, and the session attests again.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from common.attestation import NONCE_BYTES, spki_digest
from common.wire import dlora_pb2 as pb
from common.wire import dlora_pb2_grpc as pb_grpc
from edge_client.attestation import evidence
from edge_client.attestation.errors import AttestationFailed
from edge_client.attestation.policy import Policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttestedCloud:
    """A replica whose evidence checked out: the certificate every channel to it pins, and what it proved."""

    target: str
    cert_pem: bytes
    server_name: str
    claims: dict[str, Any]

    def channel_credentials(self, key: bytes | None = None, chain: bytes | None = None) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.cert_pem, private_key=key, certificate_chain=chain)


def split_target(target: str) -> tuple[str, int]:
    """HOST:PORT (or [V6]:PORT, or dns:///HOST:PORT) as (host, port)."""
    rest = target.split("///", 1)[-1] if target.startswith("dns:") else target
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"attestation needs the server as HOST:PORT, got {target!r}")
    return host.strip("[]"), int(port)


def peer_certificate(target: str, timeout: float, cert: bytes | None = None, key: bytes | None = None) -> bytes:
    """The DER certificate the server at `target` presents. Not checked against any CA: the evidence, which
    must name this certificate's key, is what makes it trustworthy."""
    host, port = split_target(target)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with _client_identity(ctx, cert, key):
        try:
            with socket.create_connection((host, port), timeout=timeout) as raw, \
                    ctx.wrap_socket(raw, server_hostname=host if not _is_ip(host) else None) as tls:
                der = tls.getpeercert(binary_form=True)
        except ssl.SSLError as exc:
            raise AttestationFailed("tls.handshake", f"no TLS at {target}: {exc.reason or exc}; an attested "
                                                     "cloud_server always serves TLS") from None
        except OSError as exc:
            raise ConnectionError(f"no cloud_server answers at {target}: {exc}") from None
    if not der:
        raise AttestationFailed("tls.certificate", f"the server at {target} presented no certificate")
    return der


@contextlib.contextmanager
def _client_identity(ctx: ssl.SSLContext, cert: bytes | None, key: bytes | None) -> Iterator[None]:
    """ssl loads a client certificate from files only: write them to private temporary files for the handshake."""
    if not (cert and key):
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            path = os.path.join(tmp, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(path)
        ctx.load_cert_chain(paths[0], paths[1])
        yield


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def certificate_name(cert: x509.Certificate) -> str:
    """A DNS name the certificate holds, for gRPC's host-name check of the pinned certificate."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
        if names:
            return names[0]
    except x509.ExtensionNotFound:
        pass
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn:
        raise AttestationFailed("tls.certificate", "the server certificate names no host (no DNS SAN, no CN)")
    return str(cn[0].value)


def attest(target: str, policy: Policy, *, timeout: float = 30.0, cert: bytes | None = None,
           key: bytes | None = None) -> AttestedCloud:
    """Check the evidence of the replica at `target`; AttestedCloud, or AttestationFailed naming the check."""
    der = peer_certificate(target, timeout, cert, key)
    leaf = x509.load_der_x509_certificate(der)
    spki = leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pinned = AttestedCloud(target, leaf.public_bytes(serialization.Encoding.PEM), certificate_name(leaf), {})
    nonce = secrets.token_bytes(NONCE_BYTES)
    options = [("grpc.ssl_target_name_override", pinned.server_name),
               ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.secure_channel(target, pinned.channel_credentials(key, cert), options=options) as channel:
        try:
            # No metadata: not even the token goes out before the evidence checks out.
            reply = pb_grpc.DLoRAStub(channel).Attest(pb.AttestRequest(nonce=nonce), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise AttestationFailed("tee.evidence", f"{target}: {exc.details()}") from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise AttestationFailed("tee.evidence", f"{target} has no Attest call (an older cloud_server)") \
                    from None
            raise ConnectionError(f"attestation call to {target} failed: {code} {exc.details()}") from None
    claims = evidence.check(reply, nonce, spki_digest(spki), policy)
    log.info("attested %s: %s, %s", target, policy.tee.value, _summary(claims))
    return AttestedCloud(target, pinned.cert_pem, pinned.server_name, claims)


def _summary(claims: dict[str, Any]) -> str:
    cpu = claims.get("cpu", {})
    measurement = cpu.get("measurement") or cpu.get("mrtd") or "?"
    gpus = claims.get("gpus") or []
    return f"measurement {str(measurement)[:16]}…, {len(gpus)} GPU(s), TLS key {claims['tls_key_sha256'][:16]}…"
