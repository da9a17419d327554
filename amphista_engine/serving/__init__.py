"""`amphista serve`: an OpenAI-compatible HTTP server over one Engine (standard library only).

    from amphista_engine.serving import make_server
    httpd = make_server(engine, "127.0.0.1", 8000)
    httpd.serve_forever()
"""
from .server import DEFAULTS, OpenAIApp, make_server  # noqa: F401

__all__ = ["DEFAULTS", "OpenAIApp", "make_server"]
