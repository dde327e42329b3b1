"""Build and start the gRPC server, with health checking and reflection on."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pml.app import App
from pml.errors import PortInUse
from pml.gateway import event_services, services
from pml.v1 import pml_pb2 as pb
from pml.v1 import pml_pb2_grpc as rpc

# Room for the rest of a message around the largest image a Predict call may carry.
MESSAGE_OVERHEAD = 1024 * 1024

SERVICE_NAMES = [
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in (
        "AccountService", "ModelService", "RunService", "EventService", "SnapshotService", "ApprovalService",
        "PredictionService", "ArtifactService", "AuditService", "WebhookService",
    )
]


def build_server(app: App, address: str, max_workers: int = 32) -> tuple[grpc.Server, int]:
    """A started server bound to ``address`` ("host:port"; port 0 picks one) and its port."""
    message_limit = app.settings.max_image_bytes + MESSAGE_OVERHEAD
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[
            # Without this a second gateway on the same port starts and takes half the calls.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", message_limit),
            ("grpc.max_send_message_length", message_limit),
        ],
    )
    rpc.add_AccountServiceServicer_to_server(services.AccountService(app), server)
    rpc.add_ModelServiceServicer_to_server(services.ModelService(app), server)
    rpc.add_RunServiceServicer_to_server(services.RunService(app), server)
    rpc.add_SnapshotServiceServicer_to_server(services.SnapshotService(app), server)
    rpc.add_ApprovalServiceServicer_to_server(services.ApprovalService(app), server)
    rpc.add_PredictionServiceServicer_to_server(services.PredictionService(app), server)
    rpc.add_ArtifactServiceServicer_to_server(services.ArtifactService(app), server)
    rpc.add_AuditServiceServicer_to_server(services.AuditService(app), server)
    rpc.add_EventServiceServicer_to_server(event_services.EventService(app), server)
    rpc.add_WebhookServiceServicer_to_server(event_services.WebhookService(app), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in SERVICE_NAMES + [""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(SERVICE_NAMES + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    wanted = int(address.rsplit(":", 1)[1])
    if port == 0 or (wanted and port != wanted):
        raise PortInUse(f"cannot listen on {address} (in use, or not a valid port)")
    server.start()
    return server, port
