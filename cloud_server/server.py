"""The gRPC server around a DLoRAService: its handlers, TLS, health checks, the reaper and shutdown."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message

from cloud_server.errors import answers_errors
from cloud_server.parsing import Undecodable, lenient_parser
from cloud_server.recorder import CallRecord, MessageRecorder
from cloud_server.service import SERVICE, SERVICE_NAME, DLoRAService

if TYPE_CHECKING:
    from grpc_health.v1.health import HealthServicer
    from prometheus_client import Counter

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _refuse(context: grpc.ServicerContext, method: str, detail: str) -> None:
    log.warning("%s refused (INVALID_ARGUMENT): %s", method, detail)
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)


def _single_request(behavior: Behavior, method: str, refused: Callable[[grpc.StatusCode], object]) -> Behavior:
    """Serve a unary-request method from a request stream: exactly one decodable message.

    Registered as a stream, so a call that closes without its message gets
    INVALID_ARGUMENT here rather than grpcio's UNIMPLEMENTED.
    """
    def handle(requests: Iterator[Message | Undecodable], context: grpc.ServicerContext) -> Any:
        request = next(requests, None)
        if request is None or isinstance(request, Undecodable):
            refused(grpc.StatusCode.INVALID_ARGUMENT)
            # (None is also seen after gRPC itself refused an oversized message: that call already has its status.)
            _refuse(context, method, f"{method} needs one request message and got none" if request is None
                    else str(request))
        return behavior(request, context)

    return handle


def _recorded(behavior: Behavior, method: str, recorder: MessageRecorder, streams_replies: bool) -> Behavior:
    """Serve `behavior`, writing each message of the call to the recorder: requests as they
    arrive, replies as they leave."""
    def handle(requests: Iterator[Message | Undecodable], context: grpc.ServicerContext) -> Any:
        record = recorder.call(method)

        def tee() -> Iterator[Message | Undecodable]:
            for msg in requests:
                if not isinstance(msg, Undecodable):
                    record.add(msg)
                yield msg

        if not streams_replies:
            reply = behavior(tee(), context)
            record.add_reply(reply)
            return reply
        return _replies_recorded(behavior(tee(), context), record)

    return handle


def _replies_recorded(replies: Iterator[Message], record: CallRecord) -> Iterator[Message]:
    for reply in replies:
        record.add_reply(reply)
        yield reply


def method_handlers(service: DLoRAService) -> dict[str, grpc.RpcMethodHandler]:
    """The service's handlers, built from the proto's service descriptor like the
    generated `add_DLoRAServicer_to_server`, but with requests parsed leniently
    and every exception a handler raises answered with its status (errors.py)."""
    handlers = {}
    metrics = service.metrics
    for method in SERVICE.methods:
        parse, serialize = metrics.counting(method.name,
                                            lenient_parser(message_factory.GetMessageClass(method.input_type)),
                                            message_factory.GetMessageClass(method.output_type).SerializeToString)
        errors = partial(_count_error, metrics.errors, method.name)
        behavior = answers_errors(getattr(service, method.name), on_error=errors)
        if not method.client_streaming:
            behavior = _single_request(behavior, method.name, errors)
        if service.recorder is not None:
            behavior = _recorded(behavior, method.name, service.recorder, method.server_streaming)
        # Every method takes a request stream (see _single_request); replies as the proto says.
        make = grpc.stream_stream_rpc_method_handler if method.server_streaming else \
            grpc.stream_unary_rpc_method_handler
        handlers[method.name] = make(behavior, request_deserializer=parse, response_serializer=serialize)
    return handlers


def _count_error(errors: Counter, method: str, code: grpc.StatusCode) -> None:
    errors.labels(method, code.name).inc()


@dataclass
class TLSFiles:
    cert: bytes
    key: bytes
    client_ca: bytes | None = None    # set: clients must present a certificate signed by it


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    service: DLoRAService
    health: HealthServicer
    stop_reaper: threading.Event = field(default_factory=threading.Event)

    def shutdown(self, grace: float) -> None:
        from grpc_health.v1 import health_pb2

        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        finished = self.service.drain(grace)
        self.service.federations.cancel_all()
        log.info("in-flight steps %s", "finished" if finished else f"aborted after {grace:.0f} s")
        self.stop_reaper.set()
        self.server.stop(grace=1.0).wait()
        self.service.sessions.close_all("closed: server shut down")


def make_server(service: DLoRAService, host: str, port: int, tls: TLSFiles | None = None,
                workers: int | None = None, stats_every: float = 60.0) -> RunningServer:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    size = service.message_limit
    opts = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    # Each in-flight step holds one handler thread (plus its worker and pump threads).
    workers = workers or max(16, 2 * service.limits.max_sessions + 8)
    # Beyond the pool, calls are refused (RESOURCE_EXHAUSTED) rather than queued without bound.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dlora-rpc"),
                         options=opts, maximum_concurrent_rpcs=workers)
    # Not pb_grpc.add_DLoRAServicer_to_server: its deserializers raise on bad bytes (INTERNAL and a traceback).
    handlers = method_handlers(service)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.client_ca,
                                            require_client_auth=tls.client_ca is not None)
        bound = server.add_secure_port(address, creds)
    if bound == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, bound, service, health_servicer)
    threading.Thread(target=service.reap_forever, args=(running.stop_reaper, stats_every), name="dlora-reaper",
                     daemon=True).start()
    return running
