"""Our own compact implementation of the Llama family (Llama 1/2/3, Mistral, Qwen2, SmolLM).

Why our own: the decoding loop needs things a generic model API makes slow or impossible — a
KV cache where rolling back a rejected draft is moving a pointer, explicit positions and an
arbitrary attention mask over the block (tree drafts), logits only for the rows asked for, and
skipping any attention or MLP sub-layer (self-speculative drafting). The math follows
transformers' implementation step for step, so logits agree with it (tested in float32).

The parts: ``config.py`` reads config.json, ``kernels.py`` holds the math (norms, rotary,
attention, the packed linear), ``kv_cache.py`` the cache that grows with the sequence; this
module loads the weights and runs the forward.

Loads a Hugging Face folder directly: config.json + *.safetensors (sharded or not), one decoder
layer at a time from the memory-mapped files, so that loading peaks near the final footprint:
each layer's tensors are read, fused (q/k/v, gate/up), packed, and the plain copies dropped
before the next layer is read.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..errors import ModelLoadError
from . import invariance
from .base import Backend, SkipSet
from .config import NativeConfig
from .invariance import ROWWISE_MAX_BLOCK
from .kernels import Linear, attention, attention_mask, attention_rowwise, can_pack, rms_norm, rotate, row_plans, stack_hidden
from .kv_cache import KVCache


class SafetensorsFolder:
    """A model folder's tensors by name, read on demand.

    Each read opens the file that holds the tensor (memory-mapped), copies the tensor out and
    closes the file: a mapping left alive would keep every page read through it resident, so
    that the weights would count twice."""

    def __init__(self, path: Path):
        self.path = path
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"model folder {str(path)!r} has no *.safetensors weights")
        self.where: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        self.where[name] = f
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ModelLoadError(f"cannot read weights {f}: {e}") from None

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.where if n.startswith(prefix)]

    def read(self, names: list[str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors, cast to ``dtype`` on ``device``."""
        missing = [n for n in names if n not in self.where]
        if missing:
            raise ModelLoadError(f"weights in {str(self.path)!r} lack tensor {missing[0]!r}")
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        for f, group in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as st:
                    for n in group:
                        # A copy of our own: a tensor read from the file can be a view of its
                        # memory map, which would keep the whole file mapped (and every page
                        # read through it resident) for as long as the model lives.
                        out[n] = st.get_tensor(n).to(device, dtype, copy=True)
            except Exception as e:  # noqa: BLE001
                raise ModelLoadError(f"cannot read weights {f}: {e}") from None
        return out

    def reader(self, names: list[str], device: torch.device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        """A function that reads ``names`` again and joins them along the output dimension (a
        fused linear's plain weight, for ``Linear.source``)."""
        return lambda: torch.cat(list(self.read(names, device, dtype).values()))


def return_freed_memory() -> None:
    """Hand the heap memory freed by a load's temporaries back to the system (glibc keeps it for
    reuse otherwise: ~0.7 GB after building Qwen2.5-1.5B's int4 copy, counted in the process's
    RSS for its whole life). A no-op where the C library has no ``malloc_trim``."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


FUSED = {  # a fused linear -> the checkpoint's tensors, in order
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


class Layer:
    """Weights of one decoder layer. q/k/v and gate/up are fused: one matmul each."""

    def __init__(self, attn_norm: torch.Tensor, mlp_norm: torch.Tensor, linears: dict[str, Linear]):
        self.attn_norm, self.mlp_norm = attn_norm, mlp_norm
        self.qkv, self.o, self.gate_up, self.down = (linears[r] for r in FUSED)

    @classmethod
    def load(cls, folder: SafetensorsFolder, index: int, cfg: NativeConfig, *, device, dtype, pack: bool) -> "Layer":
        prefix = f"model.layers.{index}."
        biases = {"qkv": cfg.qkv_bias, "o": cfg.o_bias, "gate_up": cfg.mlp_bias, "down": cfg.mlp_bias}
        names = [prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"]
        for role, parts in FUSED.items():
            names += [f"{prefix}{p}.weight" for p in parts] + ([f"{prefix}{p}.bias" for p in parts] if biases[role] else [])
        t = folder.read(names, device, dtype)
        linears = {}
        for role, parts in FUSED.items():
            weights = [f"{prefix}{p}.weight" for p in parts]
            weight = torch.cat([t.pop(n) for n in weights]) if len(parts) > 1 else t.pop(weights[0])
            bias = torch.cat([t.pop(f"{prefix}{p}.bias") for p in parts]) if biases[role] else None
            # A packed linear drops its plain weight and reads it again from the files if asked.
            linears[role] = Linear(weight, bias, pack, source=folder.reader(weights, device, dtype) if pack else None)
            del weight
        return cls(t[names[0]], t[names[1]], linears)


class NativeBackend(Backend):
    name = "native"
    supports_tree = True
    supports_skip = True
    supports_self_draft = True
    supports_hidden = True

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
        linears (a quantized model by choice; see ``quant.py``), each layer quantized as it is
        read, so the full-precision model is never in memory."""
        path = Path(path)
        self.config = cfg = NativeConfig.from_folder(path)
        self.device = torch.device(device)
        self.dtype = dtype or cfg.torch_dtype or torch.float32
        self.vocab_size = cfg.vocab_size
        self.max_length = min(max_length or cfg.max_position_embeddings, cfg.max_position_embeddings)

        folder = SafetensorsFolder(path)
        dev, dt = self.device, self.dtype
        top = folder.read(["model.embed_tokens.weight", "model.norm.weight"], dev, dt)
        self.embed, self.norm = top["model.embed_tokens.weight"], top["model.norm.weight"]
        pack = can_pack(self.dtype, self.device)
        if cfg.tie_word_embeddings:
            # Shared with the embedding table, so left unpacked: no second copy in memory.
            self.lm_head = Linear(self.embed, None, pack=False)
        else:
            pack_head = pack and not (quantize and quantize.lm_head)
            head = folder.read(["lm_head.weight"], dev, dt)["lm_head.weight"]
            self.lm_head = Linear(head, None, pack_head, source=folder.reader(["lm_head.weight"], dev, dt) if pack_head else None)
            del head
        quantize_layer = None
        if quantize is not None:
            from .quant import layer_quantizer

            pack = False  # packing is wasted on weights about to be quantized
            quantize_layer = layer_quantizer(quantize, cfg.num_layers)
        self.quantized_bytes = 0  # bytes of quantized linears, when the model itself is quantized
        self.layers = []
        for i in range(cfg.num_layers):
            layer = Layer.load(folder, i, cfg, device=dev, dtype=dt, pack=pack)
            if quantize_layer is not None:
                layer, added = quantize_layer(i, layer)
                self.quantized_bytes += added
            self.layers.append(layer)
        if quantize is not None and quantize.lm_head:
            from .quant import QuantLinear

            self.lm_head = QuantLinear.from_linear(self.lm_head, quantize)
            self.quantized_bytes += self.lm_head.nbytes

        # RoPE tables for every position, in float32, cast like transformers does.
        pos = torch.arange(self.max_length, dtype=torch.float32)
        freqs = torch.outer(pos, cfg.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = (emb.cos() * cfg.rope_attention_scaling).to(self.device, self.dtype)
        self._sin = (emb.sin() * cfg.rope_attention_scaling).to(self.device, self.dtype)

        self.cache = self.new_cache()
        self._scale = 1.0 / math.sqrt(cfg.head_dim)
        self._q_size = cfg.num_heads * cfg.head_dim
        self._kv_size = cfg.num_kv_heads * cfg.head_dim
        self.row_checks = self._check_row_invariance()
        return_freed_memory()

    # ---- the KV cache (kv_cache.py) -----------------------------------------------------------
    def new_cache(self, max_length: int | None = None) -> KVCache:
        """An empty KV cache for this model (grown as its sequence lengthens)."""
        cfg = self.config
        return KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, min(max_length or self.max_length, self.max_length),
                       dtype=self.dtype, device=self.device)  # fmt: skip

    def with_cache(self, cache: KVCache, weights=None) -> "NativeBackend":
        """This model over another KV cache (the same weights, norms and tables, not copied), or
        with ``weights``' linears (a quantized copy) in place of its own."""
        view = copy.copy(self)
        view.cache = cache
        if weights is not None:
            view.layers, view.lm_head = weights.layers, weights.lm_head
        return view

    @property
    def length(self) -> int:
        return self.cache.length

    @length.setter
    def length(self, value: int) -> None:
        self.cache.length = value

    @property
    def k_cache(self) -> torch.Tensor:
        return self.cache.k

    @property
    def v_cache(self) -> torch.Tensor:
        return self.cache.v

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's weights in memory (a tied lm_head counted once)."""
        tensors = [self.embed, self.norm] + [t for layer in self.layers for t in (layer.attn_norm, layer.mlp_norm)]
        linears = [lin for ls in self.linears().values() for lin in ls if lin.weight is not self.embed]
        return sum(t.nbytes for t in tensors) + sum(lin.nbytes for lin in linears)

    def linears(self) -> dict[str, list[Linear]]:
        """Every linear by role ("layers.*.qkv", ..., "lm_head"), in layer order."""
        roles: dict[str, list[Linear]] = {}
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

        weights = quantized_copy(self, config)
        return_freed_memory()
        return weights

    def twin(self, weights) -> "NativeBackend":
        return self.with_cache(self.new_cache(self.cache.max_length), weights)

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

    # ---- cache management -------------------------------------------------------------------
    def _truncate(self, length: int) -> None:
        self.length = length  # entries past the pointer are simply overwritten later

    def keep(self, start: int, rows: list[int]) -> None:
        self.cache.keep(start, rows)

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
        hidden_layers: tuple[int, ...] | None = None,
    ):
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
        self.cache.reserve(start + n)
        k_cache, v_cache = self.cache.k, self.cache.v
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
        captured: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            if hidden_layers and i in hidden_layers:
                captured[i] = x
            if i not in skip_attn:
                h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
                qkv = layer.qkv(h)
                q, k, v = qkv.split([self._q_size, self._kv_size, self._kv_size], dim=-1)
                q = rotate(q.view(n, cfg.num_heads, cfg.head_dim).transpose(0, 1), cos, sin)
                k = rotate(k.view(n, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1), cos, sin)
                k_cache[i, :, start:end] = k
                v_cache[i, :, start:end] = v.view(n, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1)
                window = cfg.sliding_windows[i]
                keys, values = k_cache[i, :, :end], v_cache[i, :, :end]
                if rowwise:
                    if window not in plans:
                        plans[window] = row_plans(start, n, positions.tolist(), tree_mask, window)
                    attn = attention_rowwise(q, keys, values, plans[window], self._scale)
                else:
                    if window not in masks:
                        masks[window] = attention_mask(start, n, positions, tree_mask, window, context, self.device)
                    attn = attention(q, keys, values, masks[window], self._scale)
                x = x + layer.o(attn.transpose(0, 1).reshape(n, self._q_size))
            if i not in skip_mlp:
                h = rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
                gate, up = layer.gate_up(h).chunk(2, dim=-1)
                x = x + layer.down(F.silu(gate) * up)
        self.length = end
        if hidden_layers:
            normed = rms_norm(x, self.norm, cfg.rms_norm_eps)
            hidden = stack_hidden(hidden_layers, captured, normed, len(layers))
            logits = None if logits_rows is None else lm_head(normed[logits_rows]).float()
            return logits, hidden
        if logits_rows is None:
            return None
        x = rms_norm(x[logits_rows], self.norm, cfg.rms_norm_eps)
        return lm_head(x).float()
