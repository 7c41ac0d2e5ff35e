"""Bad input gets a clear error naming the argument, and changes nothing."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from specdecode import Engine, InvalidArgument, ModelLoadError
from specdecode.errors import SpecDecodeError


@pytest.fixture(scope="module")
def engine(stories_path):
    return Engine.from_pretrained(stories_path, "pld", progress=False)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a folder nor a known name"):
        Engine.from_pretrained(tmp_path / "nope", progress=False)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        Engine.from_pretrained(tmp_path, progress=False)


def test_malformed_config(tmp_path, stories_path):
    shutil.copytree(stories_path, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        Engine.from_pretrained(tmp_path / "m", progress=False)


def test_missing_weights(tmp_path, stories_path):
    shutil.copytree(stories_path, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        Engine.from_pretrained(tmp_path / "m", backend="native", progress=False)


def test_truncated_weights(tmp_path, stories_path):
    shutil.copytree(stories_path, tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        Engine.from_pretrained(tmp_path / "m", backend="native", progress=False)


def test_unsupported_architecture_native_vs_auto(tmp_path, stories_path):
    shutil.copytree(stories_path, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="native backend supports"):
        Engine.from_pretrained(tmp_path / "m", backend="native", progress=False)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"method": "magic"}, "method"),
        ({"backend": "tpu"}, "backend"),
        ({"dtype": "int3"}, "dtype"),
        ({"method": "sps"}, "draft_model"),
        ({"method": "pld", "draft_model": "x"}, "draft_model"),
        ({"method": "pld", "max_ngram": 0}, "max_ngram"),
        ({"method": "pld", "bogus": 1}, "method_options"),
        ({"draft_length": -1}, "draft_length"),
    ],
)
def test_bad_engine_arguments(stories_path, kwargs, argument):
    with pytest.raises(InvalidArgument) as e:
        Engine.from_pretrained(stories_path, progress=False, **kwargs)
    assert e.value.argument == argument
    assert str(e.value).startswith(argument + ":")


def test_draft_tokenizer_mismatch(tmp_path, stories_path):
    other = tmp_path / "other"
    shutil.copytree(stories_path, other)
    vocab = {f"w{i}": i for i in range(512)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).unlink()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2").save_pretrained(str(other))
    with pytest.raises(InvalidArgument, match="differs from the target"):
        Engine.from_pretrained(stories_path, "sps", draft_model=other, progress=False)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": [1, 99999]}, "prompt"),
        ({"prompt": "x" * 3000}, "prompt"),  # longer than the 512-token context
        ({"prompt": [{"role": "user", "content": "hi"}]}, "messages"),  # no chat template
        ({"prompt": [{"role": "user"}]}, "messages"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -5}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": "abc"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
    ],
)
def test_bad_generate_arguments_change_nothing(engine, kwargs, argument):
    args = {"prompt": "Once upon a time", "max_new_tokens": 20, **kwargs}
    before = engine.generate("Once upon a time", max_new_tokens=20).token_ids
    with pytest.raises(InvalidArgument) as e:
        engine.generate(**args)
    assert e.value.argument == argument
    assert isinstance(e.value, SpecDecodeError)
    assert engine.generate("Once upon a time", max_new_tokens=20).token_ids == before


def test_stream_checks_arguments_before_the_first_piece(engine):
    with pytest.raises(InvalidArgument):
        engine.stream("hi", max_new_tokens=0)
