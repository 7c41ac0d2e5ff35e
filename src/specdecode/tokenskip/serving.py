"""TokenSkip for generate / serve: ``--adapter DIR`` (merged at load) and ``cot_ratio`` (the
ratio written into the prompt the TokenSkip way)."""

from __future__ import annotations

from .prompts import check_ratio, format_user


def adapter_and_ratio(model: str, adapter: str | None, options: dict) -> tuple[str, dict, float | None]:
    """(the model to load: ``model``, or ``model`` with ``adapter`` merged in; the method
    options without ``cot_ratio``; ``cot_ratio`` or None)."""
    options = dict(options)
    ratio = options.pop("cot_ratio", None)
    if ratio is not None:
        ratio = check_ratio(ratio, "cot_ratio")
    if adapter is not None:
        from .merge import merged_model

        model = str(merged_model(model, adapter))
    return model, options, ratio


def with_cot_ratio(request, ratio: float | None):
    """A prompt with TokenSkip's instruction and ratio: chat messages get their last user
    message rewritten; text becomes the TokenSkip user text and a newline (the format a model
    without a chat template is trained on). Token ids are left as they are."""
    if ratio is None:
        return request
    if isinstance(request, str):
        return format_user(request, ratio) + "\n"
    if isinstance(request, list) and request and all(isinstance(m, dict) for m in request):
        out = [dict(m) for m in request]
        for m in reversed(out):
            if m.get("role") == "user" and isinstance(m.get("content"), str):
                m["content"] = format_user(m["content"], ratio)
                break
        return out
    return request


def serve_model(model: str, adapter: str | None, options: list[str] | None) -> str:
    """``serve --adapter``: the model folder to serve. The ratio is a request's own (the field
    ``cot_ratio``), so a server-wide ``-o cot_ratio`` is refused rather than ignored."""
    from ..errors import InvalidArgument

    if any(o.split("=", 1)[0].strip().replace("-", "_") == "cot_ratio" for o in options or []):
        raise InvalidArgument(
            "cot_ratio", "serve takes the ratio per request: send the field \"cot_ratio\": 0.6 with each request "
            "(or put it in the prompt with specdecode.tokenskip.format_user(question, ratio))"
        )  # fmt: skip
    if adapter is None:
        return model
    from .merge import merged_model

    return str(merged_model(model, adapter))
