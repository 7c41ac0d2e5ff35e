"""Saving and loading draft heads: our own folders (the EAGLE-3 / SpecForge layout, with our
settings beside it) and the published layouts of EAGLE-1/2, EAGLE-3, vLLM's ``speculators`` and
Medusa-1 (see ``docs/trained-drafters.md`` for the sources and what each holds).

A head folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``). Ours
add a ``"specdecode"`` block to the config (kind, which hidden states, the target's
fingerprint), so that a head is refused on a target it was not trained for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import InvalidArgument, ModelLoadError
from .model import HeadConfig, make_head
from .target import target_parts

# Our module's parameter names -> the EAGLE-3 / SpecForge file's (the decoder layer is "midlayer").
EAGLE3_NAMES = {
    "fc.weight": "fc.weight",
    "layer.input_layernorm.weight": "midlayer.input_layernorm.weight",
    "layer.hidden_norm.weight": "midlayer.hidden_norm.weight",
    "layer.q_proj.weight": "midlayer.self_attn.q_proj.weight",
    "layer.k_proj.weight": "midlayer.self_attn.k_proj.weight",
    "layer.v_proj.weight": "midlayer.self_attn.v_proj.weight",
    "layer.o_proj.weight": "midlayer.self_attn.o_proj.weight",
    "layer.post_attention_layernorm.weight": "midlayer.post_attention_layernorm.weight",
    "layer.gate_proj.weight": "midlayer.mlp.gate_proj.weight",
    "layer.up_proj.weight": "midlayer.mlp.up_proj.weight",
    "layer.down_proj.weight": "midlayer.mlp.down_proj.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "d2t": "d2t",
    "mask_embed": "mask_embed",
    "mask_feature": "mask_feature",
}
# EAGLE-1/2: one decoder layer "layers.0" (no input norm), fc with a bias.
EAGLE1_NAMES = {
    "fc.weight": "fc.weight",
    "fc.bias": "fc.bias",
    "layer.q_proj.weight": "layers.0.self_attn.q_proj.weight",
    "layer.k_proj.weight": "layers.0.self_attn.k_proj.weight",
    "layer.v_proj.weight": "layers.0.self_attn.v_proj.weight",
    "layer.o_proj.weight": "layers.0.self_attn.o_proj.weight",
    "layer.post_attention_layernorm.weight": "layers.0.post_attention_layernorm.weight",
    "layer.gate_proj.weight": "layers.0.mlp.gate_proj.weight",
    "layer.up_proj.weight": "layers.0.mlp.up_proj.weight",
    "layer.down_proj.weight": "layers.0.mlp.down_proj.weight",
    "lm_head.weight": "lm_head.weight",
    "d2t": "d2t",
}


def drafters_dir() -> Path:
    """Where trained heads are kept: ``$SPECDECODE_DRAFTERS`` or ~/.cache/specdecode/drafters,
    as ``<model>/<kind>/``."""
    return Path(os.environ.get("SPECDECODE_DRAFTERS") or Path.home() / ".cache" / "specdecode" / "drafters")


def cached_head(model_name: str, kinds: tuple[str, ...]) -> Path | None:
    """The first head cached for ``model_name`` among ``kinds``."""
    for kind in kinds:
        folder = drafters_dir() / model_name / kind
        if (folder / "config.json").is_file():
            return folder
    return None


def list_cached() -> list[tuple[str, str, Path]]:
    """(model, kind, folder) of every cached head."""
    root = drafters_dir()
    if not root.is_dir():
        return []
    return sorted((m.name, k.name, k) for m in root.iterdir() if m.is_dir() for k in m.iterdir() if (k / "config.json").is_file())


def _names(kind: str) -> dict[str, str]:
    return EAGLE1_NAMES if kind == "eagle1" else EAGLE3_NAMES


def _medusa_names(cfg: HeadConfig) -> dict[str, str]:
    names = {}
    for j in range(cfg.blocks):
        names[f"heads.{j}.linear.weight"] = f"{j}.0.linear.weight"
        names[f"heads.{j}.linear.bias"] = f"{j}.0.linear.bias"
        names[f"lm_heads.{j}.weight"] = f"{j}.1.weight"
    names["d2t"] = "d2t"
    return names


def save_head(head: torch.nn.Module, folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``head`` to ``folder`` in its kind's published layout, our settings beside."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg: HeadConfig = head.cfg
    names = _medusa_names(cfg) if cfg.kind == "medusa" else _names(cfg.kind)
    state = {names[k]: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items() if k in names}
    if cfg.kind != "medusa":
        # t2d: which target ids the draft vocabulary holds (EAGLE-3 stores both maps).
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[torch.arange(cfg.draft_vocab_size) + state["d2t"]] = True
        state["t2d"] = t2d
    save_file(state, str(folder / "model.safetensors"))
    config = _published_config(cfg)
    config["specdecode"] = cfg.to_dict() | (extra or {})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _published_config(cfg: HeadConfig) -> dict:
    if cfg.kind == "medusa":
        return {"medusa_num_heads": cfg.blocks, "medusa_num_layers": 1, "hidden_size": cfg.hidden_size,
                "vocab_size": cfg.draft_vocab_size}  # fmt: skip
    arch = "LlamaForCausalLMEagle3" if cfg.kind in ("eagle3", "specdec") else "LlamaForCausalLM"
    return {
        "architectures": [arch], "model_type": "llama", "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "num_hidden_layers": 1,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "tie_word_embeddings": False, "bias": cfg.fc_bias,
    } | ({"draft_vocab_size": cfg.draft_vocab_size} if arch.endswith("Eagle3") else {})  # fmt: skip


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    st = sorted(folder.glob("*.safetensors"))
    if st:
        out: dict[str, torch.Tensor] = {}
        for f in st:
            out.update(load_file(str(f)))
        return out
    bins = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if bins:
        out = {}
        for f in bins:
            out.update(torch.load(str(f), map_location="cpu", weights_only=True))
        return out
    raise ModelLoadError(f"drafter folder {str(folder)!r} has no model.safetensors or pytorch_model.bin")


def read_head(folder: str | Path, target) -> tuple[HeadConfig, dict[str, torch.Tensor]]:
    """A head folder's config (ours, or one inferred from a published layout for ``target``)
    and its weights under our module's names."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InvalidArgument("drafter", f"expected a drafter folder with config.json, got {str(folder)!r}")
    config = json.loads((folder / "config.json").read_text())
    weights = _read_weights(folder)
    if "specdecode" in config:
        cfg = HeadConfig.from_dict(config["specdecode"])
    else:
        from .published import infer_config

        cfg, weights = infer_config(config, weights, target)
    names = _medusa_names(cfg) if cfg.kind == "medusa" else _names(cfg.kind)
    inverse = {v: k for k, v in names.items()}
    return cfg, {inverse[k]: v for k, v in weights.items() if k in inverse}


def load_head(folder: str | Path, target, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The head in ``folder``, ready to draft for ``target`` (a backend exposing ``embed`` and
    ``lm_head``): checked against the target it was trained for."""
    cfg, state = read_head(folder, target)
    embed, lm_weight, fp = target_parts(target)
    for key in ("hidden_size", "vocab_size", "num_layers", "model_type"):
        if cfg.target.get(key) is not None and fp.get(key) is not None and cfg.target[key] != fp[key]:
            raise InvalidArgument(
                "drafter", f"the head in {str(folder)!r} was trained for a target with {key}={cfg.target[key]!r}; "
                f"this target has {fp[key]!r}"
            )  # fmt: skip
    if cfg.hidden_size != embed.shape[1]:
        raise InvalidArgument("drafter", f"the head in {str(folder)!r} is {cfg.hidden_size} wide; the target {embed.shape[1]}")
    dtype = dtype or target.dtype
    lm_head = None if cfg.own_lm_head else lm_weight()
    head = make_head(cfg, embed, lm_head)
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [m for m in missing if m not in ("d2t",)]
    if missing:
        raise ModelLoadError(f"the head in {str(folder)!r} lacks {missing[0]!r}")
    head.to(target.device, dtype)
    head.d2t = head.d2t.long()
    return head.eval().requires_grad_(False)
