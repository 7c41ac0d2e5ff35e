"""Our own compact implementation of the Llama family (Llama 1/2/3, Mistral, Qwen2, SmolLM).

Why our own: the decoding loop needs things a generic model API makes slow or impossible — a
preallocated KV cache where rolling back a rejected draft is moving a pointer, explicit positions
and an arbitrary attention mask over the block (tree drafts), logits only for the rows asked for,
and skipping any attention or MLP sub-layer (self-speculative drafting). The math follows
transformers' implementation step for step, so logits agree with it (tested in float32).

Loads a Hugging Face folder directly: config.json + *.safetensors (sharded or not).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..errors import ModelLoadError, UnsupportedModel
from . import invariance
from .base import Backend, SkipSet
from .invariance import ROWWISE_MAX_BLOCK

# model_type -> whether q/k/v projections carry a bias regardless of `attention_bias`
SUPPORTED_MODEL_TYPES = {"llama": False, "mistral": False, "qwen2": True}
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


@dataclass
class NativeConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_windows: list[int | None]  # per layer; None = full attention
    inv_freq: torch.Tensor
    rope_attention_scaling: float
    torch_dtype: torch.dtype | None

    @classmethod
    def from_folder(cls, path: Path) -> "NativeConfig":
        try:
            raw = json.loads((path / "config.json").read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"model folder {str(path)!r} has no config.json") from None
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {e}") from None
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"the native backend supports model types {sorted(SUPPORTED_MODEL_TYPES)}, "
                f"not {model_type!r} (use backend='hf')"
            )
        from transformers import AutoConfig

        try:
            hf = AutoConfig.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from None
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModel(
                f"the native backend supports RoPE types {sorted(STATIC_ROPE_TYPES)}, "
                f"not {rope_type!r} (use backend='hf')"
            )
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if rope_type == "default":
            base = rope["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
        layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        window = getattr(hf, "sliding_window", None)
        if model_type == "mistral":
            windows = [window] * hf.num_hidden_layers
        else:
            windows = [window if t == "sliding_attention" else None for t in layer_types]
        attention_bias = bool(getattr(hf, "attention_bias", False))
        dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=SUPPORTED_MODEL_TYPES[model_type] or attention_bias,
            o_bias=attention_bias and model_type == "llama",
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            sliding_windows=windows,
            inv_freq=inv_freq.float(),
            rope_attention_scaling=float(scaling),
            torch_dtype=dtype if isinstance(dtype, torch.dtype) else None,
        )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers: normalise in float32, cast back, then scale.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of q [H, T, hd] over k, v [KV, L, hd] (grouped-query), in float32, one matmul
    for the whole block: for long blocks (prefill) and scoring, where exactness per row is not
    needed."""
    heads, n, hd = q.shape
    kv = k.shape[0]
    qf = q.float().reshape(kv, heads // kv * n, hd)
    scores = torch.matmul(qf, k.float().transpose(1, 2)).mul_(scale)  # [KV, G*T, L]
    if mask is not None:
        scores = scores.view(kv, heads // kv, n, -1).masked_fill_(~mask, float("-inf")).view(kv, -1, mask.shape[-1])
    out = torch.matmul(scores.softmax(dim=-1), v.float())  # [KV, G*T, hd]
    return out.view(heads, n, hd).to(q.dtype)


def _row_plans(
    start: int, n: int, positions: list[int], tree_mask: torch.Tensor | None, window: int | None
) -> list[tuple]:
    """For each block row, the cache slots it attends to, in order:

    ("range", lo, hi)            slots lo .. hi-1 (a decoding step; a chain; a tree's spine)
    ("prefix_self", lo, hi, r)   slots lo .. hi-1, then the row's own slot r (a tree leaf whose
                                 ancestors are the first rows of the block)
    ("index", slots)             anything else, gathered
    """
    plans: list[tuple] = []
    tm = tree_mask.to("cpu", torch.bool).tolist() if tree_mask is not None else None
    for t in range(n):
        p = positions[t]
        lo = 0 if window is None else max(0, p - window + 1)
        if tm is None:  # a chain: positions are slots
            plans.append(("range", lo, start + t + 1))
            continue
        anc = [j for j in range(t) if tm[t][j]]
        if lo == 0 and anc == list(range(len(anc))):
            if t == len(anc):
                plans.append(("range", 0, start + t + 1))
            else:
                plans.append(("prefix_self", 0, start + len(anc), start + t))
            continue
        seen = [j for j in anc + [t] if window is None or p - positions[j] < window]
        plans.append(("index", list(range(lo, start)) + [start + j for j in seen]))
    # A leaf's trick overwrites the slot just after its prefix; that slot must hold a row that
    # is itself a plain range (never another leaf's own key).
    leaves = {plan[3] for plan in plans if plan[0] == "prefix_self"}
    for t, plan in enumerate(plans):
        if plan[0] == "prefix_self" and plan[2] in leaves:
            plans[t] = ("index", list(range(plan[1], plan[2])) + [plan[3]])
    return plans


def _attention_rowwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plans: list[tuple], scale: float) -> torch.Tensor:
    """Attention of q [H, T, hd] over the cache k, v [KV, L, hd], one row at a time.

    Each row is computed exactly as when its token is decoded alone: the same matmul shapes
    over the same keys in the same order. So a token's output in a verification block is bit
    for bit what plain decoding gives, even in bf16 (a batched matmul's reduction order depends
    on how many rows share it); speculative decoding then repeats plain decoding exactly.
    """
    heads, n, hd = q.shape
    kv = k.shape[0]
    qf = q.float()
    leaves = [t for t, plan in enumerate(plans) if plan[0] == "prefix_self"]
    # Float32 copies, private ones when the leaf trick below edits them (in a float32 model
    # .float() would return the cache itself).
    kf, vf = k.to(torch.float32, copy=bool(leaves)), v.to(torch.float32, copy=bool(leaves))
    out = torch.empty(heads, n, hd, dtype=torch.float32, device=q.device)

    def attend(t: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        scores = torch.matmul(qf[:, t].reshape(kv, heads // kv, hd), keys.transpose(1, 2)).mul_(scale)
        out[:, t] = torch.matmul(scores.softmax(dim=-1), values).reshape(heads, hd)

    for t, plan in enumerate(plans):
        if plan[0] == "range":
            attend(t, kf[:, plan[1] : plan[2]], vf[:, plan[1] : plan[2]])
        elif plan[0] == "index":
            idx = torch.tensor(plan[1], device=q.device)
            attend(t, kf[:, idx], vf[:, idx])
    # Leaves last, deepest first: each puts its own key/value right after its prefix (a slot no
    # later row reads) and attends to one contiguous run, as plain decoding would.
    for t in sorted(leaves, key=lambda t: -plans[t][2]):
        _, lo, hi, own = plans[t]
        kf[:, hi], vf[:, hi] = kf[:, own], vf[:, own]
        attend(t, kf[:, lo : hi + 1], vf[:, lo : hi + 1])
    return out.to(q.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


class _Linear:
    """y = x W^T + b.

    On CPU in bf16 the weight is pre-packed once into oneDNN's blocked layout: decoding's
    products of 1-16 rows read it at ~1.7x the bandwidth of F.linear's plain layout.

    Row invariance: a token's output must not depend on how many tokens share the product, or
    speculative decoding would drift from plain decoding by rounding. Blocks of up to
    ROWWISE_MAX_BLOCK rows are cut into chunks of ``max_rows`` and shorter ones (a decoding
    step's single row) padded to ``pad_rows``, both set from a load-time check of the kernel
    (see ``invariance.py``).
    """

    kernel = "torch"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool):
        self.bias = bias
        self.packed = pack
        self.shape = tuple(weight.shape)
        self.source = weight  # the plain weight, for the invariance check's fingerprint
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if pack else weight
        if pack:
            self.kernel = "onednn-packed"
        self.max_rows = ROWWISE_MAX_BLOCK  # until checked
        self.pad_rows = 1
        self.captured: list[torch.Tensor] | None = None  # inputs seen, while calibrating

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def check_rows(self, name: str, activations: torch.Tensor | None = None) -> invariance.RowCheck:
        result = invariance.check_linear(
            self._apply, self.source, name=name, kernel=self.kernel, dtype=self.source.dtype,
            activations=activations,
        )  # fmt: skip
        self.pad_rows, self.max_rows = result.pad_rows, result.chunk_rows
        return result

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.captured is not None:
            self.captured.append(x.detach())
        n = x.shape[0]
        if n > ROWWISE_MAX_BLOCK or self.pad_rows <= n <= self.max_rows:  # prefill needs no invariance
            return self._apply(x)
        out = []
        for chunk in x.split(self.max_rows):
            k = chunk.shape[0]
            if k < self.pad_rows:  # copies of its last row: the kernel path the check vouched for
                chunk = torch.cat([chunk, chunk[-1:].expand(self.pad_rows - k, -1)])
            out.append(self._apply(chunk)[:k])
        return torch.cat(out)


class _Layer:
    """Weights of one decoder layer. q/k/v and gate/up are fused: one matmul each."""

    def __init__(self, t: dict[str, torch.Tensor], cfg: NativeConfig, pack: bool):
        self.attn_norm = t["input_layernorm.weight"]
        self.mlp_norm = t["post_attention_layernorm.weight"]
        self.qkv = _Linear(
            torch.cat([t[f"self_attn.{n}_proj.weight"] for n in "qkv"]),
            torch.cat([t[f"self_attn.{n}_proj.bias"] for n in "qkv"]) if cfg.qkv_bias else None,
            pack,
        )
        self.o = _Linear(t["self_attn.o_proj.weight"], t["self_attn.o_proj.bias"] if cfg.o_bias else None, pack)
        self.gate_up = _Linear(
            torch.cat([t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"]]),
            torch.cat([t["mlp.gate_proj.bias"], t["mlp.up_proj.bias"]]) if cfg.mlp_bias else None,
            pack,
        )
        self.down = _Linear(t["mlp.down_proj.weight"], t["mlp.down_proj.bias"] if cfg.mlp_bias else None, pack)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model folder {str(path)!r} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    tensors[k] = st.get_tensor(k)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelLoadError(f"cannot read weights {f}: {e}") from None
    return tensors


class NativeBackend(Backend):
    name = "native"
    supports_tree = True
    supports_skip = True
    supports_self_draft = True

    def __init__(
        self,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
        quantize=None,
    ):
        """``quantize``: a ``quant.QuantConfig`` to serve the model with weight-only int4/int8
        linears (a quantized model by choice; see ``quant.py``)."""
        path = Path(path)
        self.config = cfg = NativeConfig.from_folder(path)
        self.device = torch.device(device)
        self.dtype = dtype or cfg.torch_dtype or torch.float32
        self.vocab_size = cfg.vocab_size
        self.max_length = min(max_length or cfg.max_position_embeddings, cfg.max_position_embeddings)

        raw = _load_tensors(path)
        get = self._getter(raw, path)
        self.embed = get("model.embed_tokens.weight")
        self.norm = get("model.norm.weight")
        pack = _can_pack(self.dtype, self.device)
        if cfg.tie_word_embeddings:
            # Shared with the embedding table, so left unpacked: no second copy in memory.
            self.lm_head = _Linear(self.embed, None, pack=False)
        else:
            self.lm_head = _Linear(get("lm_head.weight"), None, pack and not (quantize and quantize.lm_head))
        pack = pack and quantize is None  # packing is wasted on weights about to be quantized
        self.layers = []
        for i in range(cfg.num_layers):
            prefix = f"model.layers.{i}."
            names = [k[len(prefix):] for k in raw if k.startswith(prefix)]
            try:
                self.layers.append(_Layer({n: get(prefix + n) for n in names}, cfg, pack))
            except KeyError as e:
                raise ModelLoadError(f"weights in {str(path)!r} lack tensor {prefix}{e.args[0]}") from None
        del raw
        self.quantized_bytes = 0  # bytes of quantized linears, when the model itself is quantized
        if quantize is not None:
            from .quant import quantize_in_place

            self.quantized_bytes = quantize_in_place(self, quantize)

        # RoPE tables for every position, in float32, cast like transformers does.
        pos = torch.arange(self.max_length, dtype=torch.float32)
        freqs = torch.outer(pos, cfg.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = (emb.cos() * cfg.rope_attention_scaling).to(self.device, self.dtype)
        self._sin = (emb.sin() * cfg.rope_attention_scaling).to(self.device, self.dtype)

        shape = (cfg.num_layers, cfg.num_kv_heads, self.max_length, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.length = 0
        self._scale = 1.0 / math.sqrt(cfg.head_dim)
        self._q_size = cfg.num_heads * cfg.head_dim
        self._kv_size = cfg.num_kv_heads * cfg.head_dim
        self.row_checks = self._check_row_invariance()

    def linears(self) -> dict[str, list[_Linear]]:
        """Every linear by role ("layers.*.qkv", ..., "lm_head"), in layer order."""
        roles: dict[str, list[_Linear]] = {}
        for layer in self.layers:
            for role in ("qkv", "o", "gate_up", "down"):
                roles.setdefault(f"layers.*.{role}", []).append(getattr(layer, role))
        roles["lm_head"] = [self.lm_head]
        return roles

    def _check_row_invariance(self) -> list[invariance.RowCheck]:
        """Set every linear's chunk size from a check of its kernel on real activations.

        A calibration forward (fixed pseudo-random tokens, long enough to take the batched
        path) captures each linear's inputs. Per role, the first, middle and last layer's
        linears are checked with their own weights and inputs (the rounding that reveals a
        kernel's change depends on both); every linear of the role gets a plan all of them allow.
        """
        roles = self.linears()
        picked = {role: sorted({0, len(ls) // 2, len(ls) - 1}) for role, ls in roles.items()}
        for role, ls in roles.items():
            for i in picked[role]:
                ls[i].captured = []
        n = min(ROWWISE_MAX_BLOCK + 8, self.max_length)
        ids = torch.randint(0, self.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
        try:
            self.forward(ids, logits_rows=slice(None))
        finally:
            self.reset()
        results = []
        for role, ls in roles.items():
            checked = []
            for i in picked[role]:
                acts = torch.cat(ls[i].captured) if ls[i].captured else None
                ls[i].captured = None
                checked.append(ls[i].check_rows(role, acts))
            # One plan for the role. Each layer's is consistent on its range [pad, chunk] of
            # row counts, so all are on the intersection; rows alone (1, 1) if it is empty.
            pad, chunk = max(c.pad_rows for c in checked), min(c.chunk_rows for c in checked)
            if pad > chunk:
                pad, chunk = 1, 1
            weakest = min(checked, key=lambda c: c.invariant_rows)
            exact = all(c.exact for c in checked)
            if not exact:  # float32: left whole (see invariance.check_linear)
                pad, chunk = 1, ROWWISE_MAX_BLOCK
            for lin in ls:
                lin.pad_rows, lin.max_rows = pad, chunk
            results.append(dataclasses.replace(weakest, pad_rows=pad, chunk_rows=chunk, exact=exact,
                                               probes=sum(c.probes for c in checked)))  # fmt: skip
        return results

    def _getter(self, raw: dict[str, torch.Tensor], path: Path):
        def get(name: str) -> torch.Tensor:
            if name not in raw:
                raise ModelLoadError(f"weights in {str(path)!r} lack tensor {name!r}")
            return raw[name].to(self.device, self.dtype)

        return get

    # ---- self-drafting (see backends/base.py) --------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def fingerprint(self) -> dict:
        cfg = self.config
        return {
            "model_type": cfg.model_type,
            "num_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
        }

    def draft_forward(self, input_ids, *, skip=None, weights=None, positions=None, context=None,
                      logits_rows=slice(None)):  # fmt: skip
        return self.forward(input_ids, positions=positions, skip=skip, logits_rows=logits_rows, context=context,
                            weights=weights)  # fmt: skip

    def quantized_weights(self, config):
        from .quant import quantized_copy

        return quantized_copy(self, config)

    def twin(self, weights) -> "NativeBackend":
        twin = copy.copy(self)
        twin.layers, twin.lm_head = weights.layers, weights.lm_head
        twin.k_cache = torch.zeros_like(self.k_cache)
        twin.v_cache = torch.zeros_like(self.v_cache)
        twin.length = 0
        return twin

    @property
    def cache_bytes(self) -> int:
        return self.k_cache.nbytes + self.v_cache.nbytes

    # ---- cache management -------------------------------------------------------------------
    def _truncate(self, length: int) -> None:
        self.length = length  # entries past the pointer are simply overwritten later

    def keep(self, start: int, rows: list[int]) -> None:
        if rows != list(range(len(rows))):
            src = torch.tensor(rows, device=self.device) + start
            dst = slice(start, start + len(rows))
            self.k_cache[:, :, dst] = self.k_cache[:, :, src]
            self.v_cache[:, :, dst] = self.v_cache[:, :, src]
        self.length = start + len(rows)

    # ---- forward ------------------------------------------------------------------------------
    def _mask(
        self,
        start: int,
        n: int,
        positions: torch.Tensor,
        tree_mask: torch.Tensor | None,
        window: int | None,
        context: int,
    ) -> torch.Tensor:
        """Bool mask [n, start + n]: True where a block token may attend (the batched path:
        single tokens and verification blocks attend row by row, without a mask)."""
        block = tree_mask if tree_mask is not None else torch.ones(n, n, dtype=torch.bool).tril_()
        seen = torch.arange(start) < context
        mask = torch.cat([seen.expand(n, start), block.to("cpu", torch.bool)], dim=1)
        mask = mask.to(self.device)
        if window is not None:
            # Sliding window on positions, as transformers: keep keys with q_pos - k_pos < window.
            key_pos = torch.cat([torch.arange(start, device=self.device), positions])
            mask &= (positions[:, None] - key_pos[None, :]) < window
        return mask

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        skip: SkipSet | None = None,
        logits_rows: torch.Tensor | slice | None = slice(None),
        context: int | None = None,
        weights=None,
    ) -> torch.Tensor | None:
        """See ``Backend.forward``. Native only: ``context`` limits what the block sees of the
        cache to its first ``context`` tokens (scoring a layer set on text already decoded,
        without disturbing the cache); ``weights`` (``layers`` and ``lm_head``, e.g. a
        ``quant.QuantizedWeights``) runs other linears over the same cache (self-drafting
        through a quantized copy)."""
        layers = self.layers if weights is None else weights.layers
        lm_head = self.lm_head if weights is None else weights.lm_head
        cfg = self.config
        n = int(input_ids.shape[0])
        start = self.length
        context = start if context is None else context
        if start + n > self.max_length:
            raise ValueError(f"context overflow: {start} cached + {n} new > {self.max_length} tokens")
        input_ids = input_ids.to(self.device)
        if positions is None:
            positions = torch.arange(start, start + n, device=self.device)
        else:
            positions = positions.to(self.device)
        cos = self._cos[positions].unsqueeze(0)  # [1, n, hd]
        sin = self._sin[positions].unsqueeze(0)
        rowwise = n <= ROWWISE_MAX_BLOCK and context == start
        plans: dict[int | None, list[tuple]] = {}
        masks: dict[int | None, torch.Tensor] = {}
        skip_attn = skip.attention if skip else frozenset()
        skip_mlp = skip.mlp if skip else frozenset()

        x = F.embedding(input_ids, self.embed)  # [n, D]
        end = start + n
        for i, layer in enumerate(layers):
            if i not in skip_attn:
                h = _rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
                qkv = layer.qkv(h)
                q, k, v = qkv.split([self._q_size, self._kv_size, self._kv_size], dim=-1)
                q = _rotate(q.view(n, cfg.num_heads, cfg.head_dim).transpose(0, 1), cos, sin)
                k = _rotate(k.view(n, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1), cos, sin)
                self.k_cache[i, :, start:end] = k
                self.v_cache[i, :, start:end] = v.view(n, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1)
                window = cfg.sliding_windows[i]
                keys, values = self.k_cache[i, :, :end], self.v_cache[i, :, :end]
                if rowwise:
                    if window not in plans:
                        plans[window] = _row_plans(start, n, positions.tolist(), tree_mask, window)
                    attn = _attention_rowwise(q, keys, values, plans[window], self._scale)
                else:
                    if window not in masks:
                        masks[window] = self._mask(start, n, positions, tree_mask, window, context)
                    attn = _attention(q, keys, values, masks[window], self._scale)
                x = x + layer.o(attn.transpose(0, 1).reshape(n, self._q_size))
            if i not in skip_mlp:
                h = _rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
                gate, up = layer.gate_up(h).chunk(2, dim=-1)
                x = x + layer.down(F.silu(gate) * up)
        self.length = end
        if logits_rows is None:
            return None
        x = _rms_norm(x[logits_rows], self.norm, cfg.rms_norm_eps)
        return lm_head(x).float()
