"""``specdecode serve``: an OpenAI-compatible HTTP server over one speculative-decoding engine.

    from specdecode import Engine
    from specdecode.server import create_app
    app = create_app(Engine.from_pretrained("smollm2-135m", "pld"), api_key="secret")

Needs the ``serve`` extra (fastapi, uvicorn, pydantic). See docs/serve.md.
"""

from .app import create_app

__all__ = ["create_app"]
