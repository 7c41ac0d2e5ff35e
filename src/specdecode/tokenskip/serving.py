"""TokenSkip for generate / serve: ``--adapter DIR`` (merged at load). The ratio written into the
prompt (``cot_ratio``) is ``specdecode.reasoning``'s, beside Whisper's suffix."""

from __future__ import annotations

from ..errors import InvalidArgument


def with_adapter(model: str, adapter: str | None) -> str:
    """The model to load: ``model``, or ``model`` with ``adapter`` merged in (cached)."""
    if adapter is None:
        return model
    from .merge import merged_model

    return str(merged_model(model, adapter))


def refuse_server_ratio(cot_ratio: float | None) -> None:
    """The ratio is a request's own (the field ``cot_ratio``), so a server-wide ``-o cot_ratio``
    is refused rather than ignored."""
    if cot_ratio is not None:
        raise InvalidArgument(
            "cot_ratio", "serve takes the ratio per request: send the field \"cot_ratio\": 0.6 with each request "
            "(or put it in the prompt with specdecode.tokenskip.format_user(question, ratio))"
        )  # fmt: skip
