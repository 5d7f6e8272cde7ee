"""The served app, assembled: the OpenAI API and the page (`app.py`) plus the agent routes
(`agents.py`, which builds on the server and is never imported by it)."""

from __future__ import annotations

import os
import socket

from fastapi import FastAPI

from ..config import BlockdiffError
from .agents import add_routes
from .app import Server, create_app


def build_app(server: Server) -> FastAPI:
    return create_app(server, add_routes)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything loads: a taken port is one clear error, and
    port 0's real port is known before it is announced."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise BlockdiffError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(server: Server, sock: socket.socket, log_level: str = "info") -> None:
    import uvicorn

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = uvicorn.Config(build_app(server), log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
