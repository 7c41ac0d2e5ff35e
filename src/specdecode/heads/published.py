"""Reading heads published for other engines: EAGLE-1/2 (SafeAILab/EAGLE ``cnets1.py``),
EAGLE-3 (SafeAILab/EAGLE ``cnets.py``; SpecForge / SGLang, the same keys), vLLM's
``speculators`` format (``layers.0.`` in place of ``midlayer.``, a nested config) and Medusa-1
(FasterDecoding/Medusa ``medusa_model.py``). What each layout holds, with the commits read, is
in ``docs/trained-drafters.md``.

Each becomes a ``HeadConfig`` for the target at hand and weights under EAGLE-3's (or
EAGLE-1's, Medusa's) key names, which ``store.read_head`` maps to our modules.
"""

from __future__ import annotations

import re

import torch

from ..errors import InvalidArgument
from .model import HeadConfig, eagle3_layers
from .target import target_parts


def _target_layers(target) -> int:
    cfg = getattr(target, "config", None)
    if hasattr(cfg, "num_layers"):
        return cfg.num_layers
    return target.model.config.num_hidden_layers


def _fingerprint(target) -> dict:
    return target_parts(target)[2]


def infer_config(config: dict, weights: dict[str, torch.Tensor], target) -> tuple[HeadConfig, dict[str, torch.Tensor]]:
    """(our config, weights under EAGLE-3 / EAGLE-1 / Medusa key names) of a published head."""
    L = _target_layers(target)
    fp = _fingerprint(target)
    medusa = [k for k in weights if re.fullmatch(r"\d+\.\d+\.linear\.weight", k)]
    if medusa or "medusa_num_heads" in config:
        return _medusa(config, weights, fp)
    if "speculators_model_type" in config:
        if config["speculators_model_type"] != "eagle3":
            raise InvalidArgument("drafter", f"speculators model type {config['speculators_model_type']!r}: only eagle3 is read")
        layer_cfg = dict(config.get("transformer_layer_config") or {})
        weights = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v for k, v in weights.items()}
        layers = config.get("eagle_aux_hidden_state_layer_ids") or eagle3_layers(L)
        for flag in ("norm_before_fc", "fc_norm", "norm_output", "norm_before_residual"):
            if config.get(flag):
                raise InvalidArgument("drafter", f"speculators head with {flag}=true is not supported")
        return _eagle3(layer_cfg | {"draft_vocab_size": config.get("draft_vocab_size")}, weights, layers, fp), weights
    eagle1 = "fc.weight" in weights and any(k.startswith("layers.0.") for k in weights) and not any(
        k.startswith("layers.0.hidden_norm") for k in weights)
    if any(k.startswith("midlayer.") for k in weights) or ("draft_vocab_size" in config and not eagle1):
        eagle = config.get("eagle_config") or {}
        ids = eagle.get("eagle_aux_hidden_state_layer_ids")
        # SpecForge / SGLang count decoder-layer outputs: hidden_states[i + 1].
        layers = [i + 1 for i in ids] if ids else eagle3_layers(L)
        return _eagle3(config, weights, layers, fp), weights
    if eagle1:
        return _eagle1(config, weights, L, fp), weights
    raise InvalidArgument("drafter", "not a head layout specdecode reads (EAGLE-1/2, EAGLE-3, speculators, Medusa)")


def _shape(config: dict, weights, q_key: str) -> dict:
    H = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    hd = int(config.get("head_dim") or weights[q_key].shape[0] // heads)
    return {
        "hidden_size": H, "intermediate_size": int(config["intermediate_size"]), "num_heads": heads,
        "num_kv_heads": int(config.get("num_key_value_heads") or heads), "head_dim": hd,
        "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)), "rope_theta": float(config.get("rope_theta", 10000.0)),
    }  # fmt: skip


def _eagle3(config: dict, weights, layers, fp) -> HeadConfig:
    V = int(fp.get("vocab_size") or config["vocab_size"])
    Vd = int(config.get("draft_vocab_size") or V)
    own = "lm_head.weight" in weights
    if own:
        Vd = int(weights["lm_head.weight"].shape[0])
    if "d2t" not in weights:
        weights["d2t"] = torch.zeros(Vd, dtype=torch.long)
    return HeadConfig(kind="eagle3", vocab_size=V, draft_vocab_size=Vd, target_layers=tuple(layers), own_lm_head=own,
                      target=fp, **_shape(config, weights, "midlayer.self_attn.q_proj.weight"))  # fmt: skip


def _eagle1(config: dict, weights, L: int, fp) -> HeadConfig:
    V = int(fp.get("vocab_size") or config["vocab_size"])
    if any(k.startswith("layers.1.") for k in weights):
        raise InvalidArgument("drafter", "EAGLE-1 heads of more than one decoder layer are not supported")
    own = "lm_head.weight" in weights
    Vd = int(weights["lm_head.weight"].shape[0]) if own else V
    weights.setdefault("d2t", torch.zeros(Vd, dtype=torch.long))
    return HeadConfig(kind="eagle1", vocab_size=V, draft_vocab_size=Vd, target_layers=(L,), fc_bias="fc.bias" in weights,
                      own_lm_head=own, target=fp, **_shape(config, weights, "layers.0.self_attn.q_proj.weight"))  # fmt: skip


def _medusa(config: dict, weights, fp) -> tuple[HeadConfig, dict]:
    heads = sorted({int(k.split(".")[0]) for k in weights if re.fullmatch(r"\d+\.\d+\.linear\.weight", k)})
    layers = sorted({int(k.split(".")[1]) for k in weights if k.startswith("0.") and k.endswith(".linear.weight")})
    if len(layers) != 1:
        raise InvalidArgument("drafter", f"Medusa heads of {len(layers)} residual blocks are not supported (one is)")
    # One block per head: the file's keys are our module's ("{k}.0.linear.*", "{k}.1.weight").
    out = {key: weights[key] for k in heads for key in (f"{k}.0.linear.weight", f"{k}.0.linear.bias", f"{k}.1.weight")}
    V = int(out["0.1.weight"].shape[0])
    H = int(out["0.1.weight"].shape[1])
    out["d2t"] = torch.zeros(V, dtype=torch.long)
    cfg = HeadConfig(kind="medusa", hidden_size=H, intermediate_size=H, num_heads=1, num_kv_heads=1, head_dim=H,
                     vocab_size=V, draft_vocab_size=V, target_layers=(fp.get("num_layers", 0),), blocks=len(heads),
                     own_lm_head=True, target=fp)  # fmt: skip
    return cfg, out
