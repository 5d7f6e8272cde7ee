"""`blockdiff serve`: OpenAI-compatible completions over the canvas loop, with the page at `/`."""

from .app import Server, create_app
from .main import bind, build_app, serve

__all__ = ["Server", "bind", "build_app", "create_app", "serve"]
