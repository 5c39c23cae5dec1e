"""The edge assets (tokenizer, config, embedding, head, probe) downloaded once per model, SHA-256 checked."""
from __future__ import annotations

import hashlib
from pathlib import Path

import grpc

from common.atomic_write import write_bytes, write_text
from common.wire import dlora_pb2 as pb
from edge_client.errors import CloudError, rpc_error


def fetch(stub, session_id: str, digest: str, cache_dir: Path, timeout: float,
          metadata: tuple[tuple[str, str], ...]) -> Path:
    """The assets of the model whose asset digest is `digest`, in cache_dir/<digest[:16]>: downloaded
    and verified file by file the first time (each written whole: common/atomic_write.py), reused after."""
    dest = cache_dir / digest[:16]
    if (dest / ".complete").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[bytearray, str, int]] = {}
    try:
        for chunk in stub.GetEdgeAssets(pb.EdgeAssetsRequest(session_id=session_id), timeout=timeout,
                                        metadata=metadata):
            buf, _, _ = files.setdefault(chunk.path, (bytearray(), chunk.sha256, chunk.size))
            if chunk.offset != len(buf):
                raise CloudError(f"asset {chunk.path}: chunk at offset {chunk.offset}, expected {len(buf)}")
            buf.extend(chunk.data)
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None
    for name, (buf, sha, size) in files.items():
        if Path(name).name != name:
            raise CloudError(f"asset name {name!r} is not a plain file name")
        if len(buf) != size or hashlib.sha256(buf).hexdigest() != sha:
            raise CloudError(f"asset {name} failed its SHA-256 check; refusing to use it")
        write_bytes(dest / name, bytes(buf))
    write_text(dest / ".complete", digest)
    return dest
