"""`blockdiff serve`: OpenAI-compatible completions over the canvas loop, with the page at `/`."""

from .app import Server, create_app, serve

__all__ = ["Server", "create_app", "serve"]
