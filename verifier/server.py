"""gRPC server of the verifier service: thin servicer over VerifierEngine, plus the standard
health service, server reflection and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc

from nebula.config import VerifierServiceConfig
from nebula.grpc_host import GrpcHost
from nebula.v1 import verifier_pb2 as pb
from nebula.v1 import verifier_pb2_grpc as pb_grpc
from verifier import metrics
from verifier.engine import BatchTooLargeError, UnknownVerifierError, VerifierEngine
from nebula.clients.verifier import item_from_pb, result_to_pb

log = logging.getLogger("nebula.verifier")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VerifierService"].full_name


class VerifierServicer(pb_grpc.VerifierServiceServicer):
    def __init__(self, engine: VerifierEngine) -> None:
        self.engine = engine

    async def VerifyBatch(self, request: pb.VerifyBatchRequest,
                          context: grpc.aio.ServicerContext) -> pb.VerifyBatchResponse:
        t0 = time.monotonic()
        items = [item_from_pb(i) for i in request.items]
        try:
            results = await self.engine.verify_batch(items, request.item_timeout_s)
        except (UnknownVerifierError, BatchTooLargeError) as e:
            metrics.REQUESTS.labels("INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        metrics.REQUESTS.labels("OK").inc()
        metrics.BATCH_LATENCY.observe(time.monotonic() - t0)
        return pb.VerifyBatchResponse(results=[result_to_pb(r) for r in results])

    async def ListVerifiers(self, request: pb.ListVerifiersRequest,
                            context: grpc.aio.ServicerContext) -> pb.ListVerifiersResponse:
        return pb.ListVerifiersResponse(
            verifiers=[pb.VerifierInfo(**v) for v in self.engine.registry.info()]
        )


class VerifierServer:
    """Owns the engine (and its worker pool) and the grpc.aio server."""

    def __init__(self, config: VerifierServiceConfig) -> None:
        self.config = config
        self.engine = VerifierEngine(config)
        self.host = GrpcHost(config.host, config.port, config.max_message_mb, SERVICE_NAME,
                             config.metrics_port)

    @property
    def port(self) -> int | None:
        return self.host.port

    async def start(self) -> int:
        await self.engine.start()
        servicer = VerifierServicer(self.engine)
        return await self.host.start(
            lambda srv: pb_grpc.add_VerifierServiceServicer_to_server(servicer, srv))

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.host.stop(grace_s)
        await self.engine.close()

    async def wait(self) -> None:
        await self.host.wait()


async def serve(config: VerifierServiceConfig) -> None:
    """Run until SIGINT/SIGTERM, then drain in-flight calls and stop the workers."""
    server = VerifierServer(config)
    port = await server.start()
    names = ", ".join(server.engine.registry.names())
    msg = f"verifier service listening on {config.host}:{port} (verifiers: {names})"
    if config.metrics_port is not None:
        msg += f"; metrics on :{config.metrics_port}/metrics"
    print(msg, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop()
