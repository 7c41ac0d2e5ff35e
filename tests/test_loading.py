"""loading.py: arguments checked before anything heavy is loaded; the old names still importable."""

from __future__ import annotations

import pytest
import torch

from specdecode import loading
from specdecode.errors import InvalidArgument


def test_dtypes_by_name():
    assert loading.parse_dtype("auto") is None and loading.parse_dtype(None) is None
    assert loading.parse_dtype("bf16") is torch.bfloat16 and loading.parse_dtype(torch.float16) is torch.float16
    with pytest.raises(InvalidArgument) as e:
        loading.parse_dtype("int3")
    assert e.value.argument == "dtype"


def test_the_engine_module_still_exports_the_loading_names():
    from specdecode import engine

    for name in ("DTYPES", "parse_dtype", "load_tokenizer", "check_same_tokenizer"):
        assert getattr(engine, name) is getattr(loading, name)


def test_bad_arguments_fail_before_the_model_is_looked_up():
    for kwargs, argument in (({"dtype": "int3"}, "dtype"), ({"quantize": "int5"}, "quantize"), ({"device": "tpu:x"}, "device")):
        with pytest.raises(InvalidArgument) as e:
            loading.load_target("/no/such/model", progress=False, **kwargs)
        assert e.value.argument == argument


def test_target_and_draft_model(stories_path):
    path, tokenizer, target = loading.load_target(stories_path, dtype="float32", max_length=256, progress=False)
    assert path == stories_path and target.dtype == torch.float32 and target.max_length == 256
    assert 2 in loading.eos_token_ids(tokenizer, target)  # stories260K's </s>
    draft = loading.load_draft_model(stories_path, target=target, tokenizer=tokenizer, target_path=path, progress=False)
    assert (draft.dtype, draft.device, draft.max_length) == (target.dtype, target.device, target.max_length)
