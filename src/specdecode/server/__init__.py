"""``specdecode serve``: an OpenAI-compatible HTTP server over one speculative-decoding engine.

    from specdecode import Engine
    from specdecode.server import create_app
    app = create_app(Engine.from_pretrained("smollm2-135m", "pld"), api_key="secret")

Needs the ``serve`` extra (fastapi, uvicorn, pydantic). See docs/serve.md.
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    # Imported lazily: the CLI imports ``specdecode.server.cli`` to register ``serve`` and must
    # keep working when the serve extra (fastapi) is not installed.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
