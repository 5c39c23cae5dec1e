"""The edge's errors about the cloud: a call it refused or that broke, with the gRPC status it ended with."""
from __future__ import annotations

import grpc

from common.wire import dlora_pb2 as pb


class CloudError(RuntimeError):
    """The cloud refused a call; the text carries its status and reason."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def step_failed(msg: pb.StepFailed) -> CloudError:
    """The status the cloud sent in the stream (a proxy may have reset the stream and lost its trailers)."""
    code = next((c for c in grpc.StatusCode if c.value[0] == msg.code), grpc.StatusCode.UNKNOWN)
    return CloudError(f"cloud refused the call ({code.name}): {msg.detail[:1000]}", code)


def rpc_error(exc: grpc.RpcError) -> CloudError:
    """A failed gRPC call as a CloudError naming its status."""
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    return CloudError(f"cloud refused the call ({name}): {detail}", code)
