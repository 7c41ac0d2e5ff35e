"""Trained draft heads: small networks that read the target's own hidden states.

Three heads share one decoder layer (``HeadLayer``) and differ in what they feed it:

* ``eagle3`` (EAGLE-3, Li et al. 2025): the target's low, middle and high hidden states are
  fused by one linear (``fc``) into a feature; the layer reads [norm(embedding of the token),
  norm(feature)] (2H wide) and outputs the next feature, whose norm and lm_head give the token
  after. Drafting further, the head feeds its own output back as the feature (trained to, by
  EAGLE-3's training-time test).
* ``eagle1`` (EAGLE-1/2): the feature is the target's last hidden state (after its final norm);
  ``fc`` maps [embedding, feature] (2H) to H, then a plain decoder layer whose input norm is
  dropped; the output goes straight to the lm_head.
* ``specdec`` (SpecDec's Spec-Drafter, Xia et al. 2023, on a decoder-only target): as eagle3
  for the first token; the k - 1 tokens after it come from k - 1 [MASK] rows (learned inputs in
  place of a token and a feature) in the same forward: a block of k tokens per head forward.

``MedusaHead`` (Medusa-1, Cai et al. 2024): k residual blocks on the target's last hidden
state, head j predicting the token j + 2 ahead; no cache, no feedback.

The lm_head is either the target's (shared, never copied) or the head's own over a reduced
draft vocabulary (the most frequent tokens of the training data): ``d2t[d]`` is the offset
from draft id d to target id (target = d + d2t[d]), as EAGLE-3 and SpecForge store it.

Positions follow the target's: the pair (feature of position i, token i + 1) sits at position i.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("eagle3", "eagle1", "specdec", "medusa")


@dataclass
class HeadConfig:
    """What a head is: its kind, its shape (the target's width), where it reads the target."""

    kind: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # the target's
    draft_vocab_size: int  # == vocab_size: no reduced vocabulary
    target_layers: tuple[int, ...]  # hidden states read (Backend.forward's hidden_layers numbering)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    blocks: int = 4  # specdec: tokens per forward; medusa: heads
    fc_bias: bool = False  # eagle1 checkpoints have one
    own_lm_head: bool = True  # False: the target's lm_head (full vocabulary)
    target: dict = field(default_factory=dict)  # the target's fingerprint (checked at load)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        self.target_layers = tuple(int(i) for i in self.target_layers)

    @classmethod
    def for_target(cls, target, kind: str, *, draft_vocab_size: int | None = None, blocks: int = 4) -> "HeadConfig":
        """A head shaped for ``target`` (a native backend): its width, attention shape, RoPE
        base; EAGLE-3's three hidden states (low, middle, high: the inputs of layers 2, L/2 and
        L - 3: transformers' hidden_states[i], as EAGLE-3, vLLM and speculators number them)
        or the last one after the final norm (EAGLE-1, Medusa)."""
        cfg = target.config
        L = cfg.num_layers
        layers = eagle3_layers(L) if kind in ("eagle3", "specdec") else (L,)
        theta = float(1.0 / cfg.inv_freq[1].item() ** (cfg.head_dim / 2)) if cfg.head_dim > 2 else 10000.0
        return cls(
            kind=kind, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            vocab_size=cfg.vocab_size, draft_vocab_size=draft_vocab_size or cfg.vocab_size,
            target_layers=layers, rms_norm_eps=cfg.rms_norm_eps, rope_theta=theta, blocks=blocks,
            fc_bias=kind == "eagle1", own_lm_head=draft_vocab_size is not None and draft_vocab_size < cfg.vocab_size,
            target=target.fingerprint(),
        )  # fmt: skip

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_layers"] = list(self.target_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def eagle3_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low, middle and high hidden states of a ``num_layers`` target (inputs of
    layers 2, L // 2 and L - 3; clamped for tiny test models, where they may coincide)."""
    L = num_layers
    return tuple(min(max(i, 0), L - 1) for i in (2, L // 2, L - 3))  # type: ignore[return-value]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [..., heads, T, hd] with cos/sin [T, hd] (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class HeadLayer(nn.Module):
    """One Llama decoder layer. ``fused``: EAGLE-3's, whose attention reads [norm(embedding),
    norm(feature)] (2H) and whose residual is the feature; else EAGLE-1's, reading one H-wide
    input without an input norm."""

    def __init__(self, cfg: HeadConfig, fused: bool):
        super().__init__()
        H, hd = cfg.hidden_size, cfg.head_dim
        self.fused = fused
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, hd
        width = 2 * H if fused else H
        if fused:
            self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
            self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(width, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(width, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(width, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, H, bias=False)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, H, bias=False)

    def project(self, emb: torch.Tensor, feat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [..., heads, T, hd], k and v [..., kv, T, hd] (rotated), and the residual."""
        if self.fused:
            x = torch.cat((self.input_layernorm(emb), self.hidden_norm(feat)), dim=-1)
        else:
            x = feat  # eagle1: the fc has already joined embedding and feature
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, self.nh, self.hd).transpose(-2, -3)
        k = self.k_proj(x).view(*shape, self.nkv, self.hd).transpose(-2, -3)
        v = self.v_proj(x).view(*shape, self.nkv, self.hd).transpose(-2, -3)
        return rotate(q, cos, sin), rotate(k, cos, sin), v, feat

    def finish(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attn [..., heads, T, hd] -> the layer's output [..., T, H]."""
        h = residual + self.o_proj(attn.transpose(-2, -3).flatten(-2))
        m = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention of q [..., H, T, hd] over k, v [..., KV, S, hd] where ``mask``
    [T, S] (bool) allows, in float32."""
    rep = q.shape[-3] // k.shape[-3]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    return out.to(q.dtype)


class EagleHead(nn.Module):
    """eagle3, eagle1 and specdec heads (see the module docstring).

    ``embed`` and, without a lm_head of its own, ``target_lm_head`` are the target's tensors,
    held by reference (never trained, never saved)."""

    def __init__(self, cfg: HeadConfig, embed: torch.Tensor, target_lm_head: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        fused = cfg.kind in ("eagle3", "specdec")
        n_in = len(cfg.target_layers)
        if fused:
            self.fc = nn.Linear(n_in * H, H, bias=cfg.fc_bias) if n_in > 1 else None
        else:
            self.fc = nn.Linear(2 * H, H, bias=cfg.fc_bias)
        self.layer = HeadLayer(cfg, fused)
        self.norm = RMSNorm(H, cfg.rms_norm_eps) if fused else None
        if cfg.own_lm_head:
            self.lm_head = nn.Linear(H, cfg.draft_vocab_size, bias=False)
        else:
            self.lm_head = None
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        if cfg.kind == "specdec":
            self.mask_embed = nn.Parameter(torch.zeros(max(cfg.blocks - 1, 1), H))
            self.mask_feature = nn.Parameter(torch.zeros(H))
        self.embed = embed
        self.target_lm_head = target_lm_head
        hd = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))

    # ---- pieces ----------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def fuse(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's hidden states [..., len(target_layers), H] -> the head's feature [..., H]."""
        if self.cfg.kind == "eagle1" or self.fc is None:
            return hidden[..., 0, :]
        return self.fc(hidden.flatten(-2))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed)

    def inputs(self, emb: torch.Tensor, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, feature) as the layer reads them: eagle1 joins them with its fc first."""
        if self.cfg.kind == "eagle1":
            return emb, self.fc(torch.cat((emb, feat), dim=-1))
        return emb, feat

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """The layer's output [..., H] -> logits over the draft vocabulary [..., Vd]."""
        h = self.norm(out) if self.norm is not None else out
        if self.lm_head is not None:
            return self.lm_head(h)
        return F.linear(h, self.target_lm_head)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    # ---- training: EAGLE-3's training-time test -------------------------------------------------
    def unrolled(self, feats: torch.Tensor, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Logits of ``steps`` drafting steps at every position of a batch, as drafting sees
        them (EAGLE-3's training-time test).

        feats [B, T, H]: the fused target features of positions 0..T-1; ids [B, T + steps - 1]:
        the tokens (ids[:, i] is token i + 1). Step 1 at position i reads (feature i, token
        i + 1) and predicts token i + 2; step j reads the head's own step j - 1 output (a
        specdec head: its mask inputs) and token i + j, sits at position i + j - 1, and attends
        to step 1's keys of positions <= i and its own chain's earlier steps, exactly as the
        head's cache holds them when it drafts. Returns per step logits [B, T, Vd]."""
        B, T, _ = feats.shape
        dev = feats.device
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        out_logits = []
        keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        feat = feats
        for j in range(steps):
            positions = torch.arange(j, T + j, device=dev)
            cos, sin = self.rope(positions, feats.dtype)
            if self.cfg.kind == "specdec" and j > 0:
                emb = self.mask_embed[min(j - 1, self.mask_embed.shape[0] - 1)].expand(B, T, -1)
                feat = self.mask_feature.expand(B, T, -1)
            else:
                emb = self.embed_tokens(ids[:, j : j + T])
            emb, x = self.inputs(emb, feat)
            q, k, v, residual = self.layer.project(emb, x, cos, sin)  # q [B, H, T, hd]
            keys.append((k, v))
            attn = self._ttt_attention(q, keys, causal)
            out = self.layer.finish(attn, residual)
            out_logits.append(self.logits(out))
            feat = out
        return out_logits

    @staticmethod
    def _ttt_attention(q, keys, causal) -> torch.Tensor:
        """Attention of step len(keys)'s queries: causal over step 1's keys, plus each later
        step's key of the same position (the chain's own earlier drafts)."""
        rep = q.shape[1] // keys[0][0].shape[1]
        ks = [k.repeat_interleave(rep, dim=1).float() for k, _ in keys]
        vs = [v.repeat_interleave(rep, dim=1).float() for _, v in keys]
        qf = q.float() / math.sqrt(q.shape[-1])
        first = (qf @ ks[0].transpose(-1, -2)).masked_fill(~causal, float("-inf"))  # [B, H, T, T]
        diag = [(qf * k).sum(-1, keepdim=True) for k in ks[1:]]  # [B, H, T, 1] each
        probs = torch.cat([first] + diag, dim=-1).softmax(dim=-1)
        T = first.shape[-1]
        out = probs[..., :T] @ vs[0]
        for s, v in enumerate(vs[1:]):
            out = out + probs[..., T + s : T + s + 1] * v
        return out.to(q.dtype)


class ResBlock(nn.Module):
    """Medusa's block: x + SiLU(linear(x))."""

    def __init__(self, size: int):
        super().__init__()
        self.linear = nn.Linear(size, size)
        nn.init.zeros_(self.linear.weight)  # starts as the identity, as Medusa does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHead(nn.Module):
    """Medusa-1: ``blocks`` heads on the target's last hidden state (after its final norm);
    head j predicts the token j + 2 ahead of the hidden state's position."""

    def __init__(self, cfg: HeadConfig, embed: torch.Tensor | None = None, target_lm_head: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.heads = nn.ModuleList(ResBlock(cfg.hidden_size) for _ in range(cfg.blocks))
        self.lm_heads = (
            nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False) for _ in range(cfg.blocks))
            if cfg.own_lm_head else None
        )  # fmt: skip
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.target_lm_head = target_lm_head

    def fuse(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[..., 0, :]

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """feat [..., H] -> logits [..., blocks, Vd]."""
        outs = []
        for j, block in enumerate(self.heads):
            h = block(feat)
            outs.append(self.lm_heads[j](h) if self.lm_heads is not None else F.linear(h, self.target_lm_head))
        return torch.stack(outs, dim=-2)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]


def make_head(cfg: HeadConfig, embed: torch.Tensor, target_lm_head: torch.Tensor | None) -> nn.Module:
    if cfg.kind == "medusa":
        return MedusaHead(cfg, embed, target_lm_head)
    return EagleHead(cfg, embed, target_lm_head)
