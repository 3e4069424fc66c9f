"""The grpc.aio server every Nebula gRPC service runs on: message-size limits, the standard
health service, server reflection and the Prometheus /metrics port, set up one way."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


class GrpcHost:
    def __init__(self, host: str, port: int, max_message_mb: int, service_name: str,
                 metrics_port: int | None = None) -> None:
        self.host, self.requested_port = host, port
        self.service_name = service_name
        self.metrics_port = metrics_port
        self.port: int | None = None
        mb = max_message_mb << 20
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", mb),
                                               ("grpc.max_send_message_length", mb)])
        self._health = health.aio.HealthServicer()

    async def start(self, add_servicer: Callable[[grpc.aio.Server], None]) -> int:
        """Register the service (plus health and reflection), bind, start, report SERVING,
        and serve /metrics when a metrics port is configured; returns the bound port."""
        add_servicer(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        reflection.enable_server_reflection(
            (self.service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{self.host}:{self.requested_port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.host}:{self.requested_port}")
        await self.server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        await self._health.set(self.service_name, serving)
        await self._health.set("", serving)
        if self.metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(self.metrics_port, addr=self.host)
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        await self._health.enter_graceful_shutdown()
        await self.server.stop(grace_s)

    async def wait(self) -> None:
        await self.server.wait_for_termination()
