"""Serve the HTTP API with uvicorn in a thread of the gateway process (beside gRPC)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from pml.app import App
from pml.errors import PortInUse
from pml.http.app import build_app

START_TIMEOUT_S = 30


@dataclass
class HttpServer:
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    def stop(self, timeout_s: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def start_http_server(app: App, host: str, port: int) -> HttpServer:
    """A started server bound to ``host:port`` (0 picks a free port).

    The socket is bound here, before the thread starts, so a port in use fails at once
    with PortInUse (as the gRPC server does) instead of inside the thread.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port} for HTTP ({exc.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(build_app(app), log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="pml-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start; see the log above")
        time.sleep(0.02)
    return HttpServer(server=server, thread=thread, port=bound)
