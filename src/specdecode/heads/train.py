"""``specdecode train-drafter``: a draft head trained for a model by self-distillation.

Phases, each resumable (a killed run goes on where it stopped) and under one time budget:

1. **prompts**: user prompts from ``--prompts`` files (jsonl rows with ``question``, ``prompt``,
   ``text``, ``turns`` or ``messages``: the first user turn), and/or synthesised by the target
   itself (its chat template's user-turn prefix, sampled, de-duplicated: no dataset needed).
   A few are held out for the report.
2. **answers**: the target answers every prompt through our own batched engine (greedy, exact
   speculation), so the head learns the target's own text; stops at its share of the budget.
3. **features**: one target forward per conversation (prefill speed) gives, per position, the
   hidden states the head reads and the target's own next token (its argmax: what greedy
   verification accepts); written in shards (memory bounded).
4. **train**: the draft vocabulary (the most frequent target tokens), then AdamW with warm-up
   and a cosine decay, EAGLE-3's training-time test (the head unrolled on its own outputs for
   ``ttt_steps`` steps; SpecDec's drafter on its [MASK] rows; Medusa's heads at their offsets);
   checkpoints every few minutes.
5. **report**: the held-out prompts decoded with the head (greedy, token-identical to plain
   decoding by construction): mean accepted tokens, acceptance by depth, and what each phase
   cost (tokens/s, peak memory), as ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..errors import InvalidArgument
from .model import KINDS, HeadConfig, MedusaHead, eagle3_layers, make_head
from .store import save_head
from .target import target_parts

HELD_OUT = 12  # prompts kept for the report


@dataclass
class TrainSettings:
    model: str
    kind: str = "eagle3"
    out: str = "drafter"
    prompts: list[str] = field(default_factory=list)
    synthesize: int = 0  # prompts the target writes itself
    max_prompts: int | None = None
    answer_tokens: int = 256
    draft_vocab: int | None = 8192  # None or >= vocab: the target's lm_head
    ttt_steps: int = 3
    blocks: int = 4  # specdec: tokens per forward; medusa: heads
    time_budget: float = 3600.0  # seconds for every phase together
    max_tokens: int | None = None  # training positions to read, at most
    lr: float = 1e-3
    batch_tokens: int = 4096
    seq_len: int = 768
    threads: int | None = None
    seed: int = 0
    method: str = "pld"  # how the answers are decoded (exact: the target's own text either way)
    max_num_seqs: int = 16
    prompts_share: float = 0.07  # of the time budget, at most, for prompts the model writes
    answers_share: float = 0.5  # of the time budget, prompts and answers together (features and training get the rest)
    data_from: str | None = None  # another run's folder: its prompts, answers and features, reused
    capture: bool = False  # features from the answering forwards (no prefill pass; prompt positions unsupervised)
    dtype: str = "bfloat16"

    def check(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument("kind", f"expected one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("answer_tokens", "ttt_steps", "blocks", "batch_tokens", "seq_len", "max_num_seqs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidArgument(name, f"expected a positive integer, got {getattr(self, name)!r}")
        if not self.time_budget > 0:
            raise InvalidArgument("time_budget", f"expected a positive number of seconds, got {self.time_budget!r}")
        if not self.prompts and self.synthesize <= 0 and not self.data_from:
            raise InvalidArgument("prompts", "give --prompts FILE and/or --synthesize N (prompts the model writes itself)")
        for p in self.prompts:
            if not Path(p).expanduser().is_file():
                raise InvalidArgument("prompts", f"no file {p!r}")
            if Path(p).name == "question.jsonl" and "spec_bench" in str(p):
                raise InvalidArgument("prompts", "Spec-Bench's questions are what every benchmark measures on: never train on them")


class State:
    """``state.json`` in the output folder: which phases are done, the seconds each took."""

    def __init__(self, folder: Path):
        self.path = folder / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"seconds": {}, "done": []}

    def spent(self) -> float:
        return sum(self.data["seconds"].values())

    def add(self, phase: str, seconds: float) -> None:
        self.data["seconds"][phase] = self.data["seconds"].get(phase, 0.0) + seconds
        self.save()

    def done(self, phase: str) -> bool:
        return phase in self.data["done"]

    def finish(self, phase: str, **info) -> None:
        self.data["done"].append(phase)
        self.data.setdefault("info", {})[phase] = info
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def _bar(total, desc, initial=0):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit="tok" if desc in ("answers", "features", "train") else "it",
                dynamic_ncols=True)  # fmt: skip


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---- 1. prompts ----------------------------------------------------------------------------------
def first_user_turn(row: dict) -> str | None:
    for key in ("question", "prompt", "instruction", "text"):
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key].strip()
    if isinstance(row.get("turns"), list) and row["turns"] and isinstance(row["turns"][0], str):
        return row["turns"][0].strip()
    for m in row.get("messages") or row.get("conversations") or []:
        if isinstance(m, dict) and m.get("role", m.get("from")) in ("user", "human"):
            return str(m.get("content", m.get("value", ""))).strip() or None
    return None


def read_prompts(files: list[str]) -> list[str]:
    out: list[str] = []
    for f in files:
        path = Path(f).expanduser()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgument("prompts", f"{path}:{number}: not JSON ({e.msg})") from None
            text = first_user_turn(row) if isinstance(row, dict) else None
            if text:
                out.append(text)
    return out


def synthesize_prompts(engine, n: int, seed: int, max_num_seqs: int, deadline: float) -> list[str]:
    """User prompts written by the target itself: its chat template's user-turn prefix, sampled
    at temperature 1, cut at the end of the turn, de-duplicated."""
    tok = engine.tokenizer
    marker = "\x00USER\x00"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - no chat template
        text = marker
    prefix = text[: text.index(marker)]
    ids = tok(prefix, add_special_tokens=False)["input_ids"]
    if not ids and tok.bos_token_id is not None:
        ids = [tok.bos_token_id]
    seen: set[str] = set()
    out: list[str] = []
    round_ = 0
    bar = _bar(n, "prompts")
    while len(out) < n and time.time() < deadline and round_ < 50:
        k = min(4 * max_num_seqs, 2 * (n - len(out)))
        results = engine.generate_batch([list(ids)] * k, max_new_tokens=64, temperature=1.0, top_p=0.95,
                                        seed=[seed + 1000 * round_ + i for i in range(k)], max_num_seqs=max_num_seqs)  # fmt: skip
        round_ += 1
        for r in results:
            t = r.text.split("<|im_end|>")[0].split("<|endoftext|>")[0].strip()
            if r.finish_reason != "stop" or len(t) < 12 or t.lower() in seen:
                continue  # cut mid-sentence, or too short to be a request
            seen.add(t.lower())
            out.append(t)
            bar.update(1)
            if len(out) >= n:
                break
    bar.close()
    return out


def chat_ids(tokenizer, prompt: str) -> list[int]:
    try:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))  # fmt: skip
    except Exception:  # noqa: BLE001 - no chat template: the text itself
        return tokenizer(prompt)["input_ids"]


# ---- 3. features ---------------------------------------------------------------------------------
@torch.inference_mode()
def extract_features(target, sequences: list[list[int]], layers: tuple[int, ...], folder: Path, shard_tokens: int = 65536):
    """Per sequence: hidden states [T, len(layers), H] and the target's argmax [T], in shards
    ``features-NNNNN.safetensors`` (one per ``shard_tokens`` positions). Resumes after the last
    complete shard."""
    folder.mkdir(parents=True, exist_ok=True)
    done = sorted(folder.glob("features-*.safetensors"))
    first = 0
    if done:
        first = json.loads((folder / "shards.json").read_text())["next_sequence"]
    bar = _bar(sum(len(s) for s in sequences), "features", initial=sum(len(s) for s in sequences[:first]))
    buf: dict[str, torch.Tensor] = {}
    count, index = 0, len(done)
    for i in range(first, len(sequences)):
        ids = sequences[i][: target.max_length]
        target.reset()
        logits, hidden = target.forward(torch.tensor(ids), hidden_layers=layers)
        target.reset()
        buf[f"{i}.hidden"] = hidden.to(torch.bfloat16).contiguous()
        buf[f"{i}.ids"] = torch.tensor(ids, dtype=torch.int32)
        buf[f"{i}.argmax"] = logits.argmax(-1).to(torch.int32)
        count += len(ids)
        bar.update(len(ids))
        if count >= shard_tokens or i == len(sequences) - 1:
            save_file(buf, str(folder / f"features-{index:05d}.safetensors"))
            (folder / "shards.json").write_text(json.dumps({"next_sequence": i + 1}))
            buf, count, index = {}, 0, index + 1
    bar.close()


class FeatureRecorder:
    """Wraps the answering method's drafter and keeps the target's hidden states that the decoding
    step hands over for every token entering the cache (``Drafter.observe_hidden``): features
    captured while answering, at no extra forward (a 1.5B target's prefill of the data would
    cost as long as answering it). Each finished request's (tokens, hidden states) goes to
    ``sink``. Otherwise the wrapped drafter drafts as it would."""

    def __init__(self, inner, layers: tuple[int, ...], sink: list):
        self.inner, self.hidden_layers, self.sink = inner, tuple(layers), sink
        self.rows: list[torch.Tensor] = []
        self.tokens: list[int] = []
        self.prompt_length = 0

    def __getattr__(self, name):  # name, batchable, lossless, default_draft_length, stats, ...
        return getattr(self.inner, name)

    def begin(self, prompt_ids):
        self.rows, self.tokens, self.prompt_length = [], list(prompt_ids), len(prompt_ids)
        self.inner.begin(prompt_ids)

    def observe_hidden(self, hidden):
        self.rows.append(hidden.to("cpu", torch.bfloat16).clone())
        if self.inner.hidden_layers:
            self.inner.observe_hidden(hidden)

    def propose(self, tokens, max_tokens, params, generator):
        return self.inner.propose(tokens, max_tokens, params, generator)

    def observe(self, root, draft, logits):
        self.inner.observe(root, draft, logits)

    def update(self, tokens, num_accepted, draft):
        self.tokens = list(tokens)
        self.inner.update(tokens, num_accepted, draft)

    def end(self):
        if self.rows:
            self.sink.append((self.tokens, self.prompt_length, torch.cat(self.rows)))
            self.rows = []
        self.inner.end()

    def fork(self, target=None):
        return FeatureRecorder(self.inner.fork(target), self.hidden_layers, self.sink)


def captured_record(tokens: list[int], prompt_length: int, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """A features record from a greedy answer: hidden states of every cached token, and as the
    target's own next token the one it emitted (-1 inside the prompt, where it was not computed;
    the last prompt token's is the answer's first)."""
    n = hidden.shape[0]  # the cached tokens: all but the last
    ids = torch.tensor(tokens[:n], dtype=torch.int32)
    nxt = torch.tensor(tokens[1 : n + 1], dtype=torch.int32)
    nxt[: max(prompt_length - 1, 0)] = -1
    return {"hidden": hidden.contiguous(), "ids": ids, "argmax": nxt}


def load_features(folder: Path) -> list[dict[str, torch.Tensor]]:
    seqs: dict[int, dict[str, torch.Tensor]] = {}
    for f in sorted(folder.glob("features-*.safetensors")):
        for name, t in load_file(str(f)).items():
            i, what = name.split(".")
            seqs.setdefault(int(i), {})[what] = t
    return [seqs[i] for i in sorted(seqs)]


# ---- 4. the head and its training --------------------------------------------------------------
def draft_vocabulary(seqs: list[dict[str, torch.Tensor]], vocab_size: int, size: int | None) -> torch.Tensor:
    """The ``size`` target tokens the target predicts most often in the data (sorted ids), or
    every token."""
    if size is None or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in seqs:
        labels = s["argmax"].long()
        counts += torch.bincount(labels[labels >= 0], minlength=vocab_size)
        counts += torch.bincount(s["ids"].long(), minlength=vocab_size)
    return counts.topk(size).indices.sort().values


def new_head(target, cfg: HeadConfig, vocab: torch.Tensor) -> torch.nn.Module:
    """A head for ``target`` to train: embedding and (without a reduced vocabulary) lm_head the
    target's, frozen; a reduced lm_head starts as the target's rows for those tokens; the
    decoder layer starts from the target's last layer (its attention reading the feature half)."""
    embed, lm_weight, _ = target_parts(target)
    full = lm_weight().float()
    head = make_head(cfg, embed.float(), None if cfg.own_lm_head else full)
    head.d2t.copy_(vocab - torch.arange(len(vocab)))
    torch.manual_seed(0)
    if isinstance(head, MedusaHead):
        if head.lm_heads is not None:
            for lin in head.lm_heads:
                lin.weight.data.copy_(full[vocab])
        return head
    if head.lm_head is not None:
        head.lm_head.weight.data.copy_(full[vocab])
    last = target.layers[-1]
    H = cfg.hidden_size
    q, k, v = last.qkv.plain().float().split([cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                                              cfg.num_kv_heads * cfg.head_dim])  # fmt: skip
    gate, up = last.gate_up.plain().float().chunk(2)
    lay = head.layer
    for lin, w in ((lay.q_proj, q), (lay.k_proj, k), (lay.v_proj, v)):
        if lay.fused:  # [embedding half | feature half]
            lin.weight.data.normal_(0, 0.02)
            lin.weight.data[:, H:] = w
        else:
            lin.weight.data.copy_(w)
    lay.o_proj.weight.data.copy_(last.o.plain().float())
    lay.gate_proj.weight.data.copy_(gate)
    lay.up_proj.weight.data.copy_(up)
    lay.down_proj.weight.data.copy_(last.down.plain().float())
    lay.post_attention_layernorm.weight.data.copy_(last.mlp_norm.float())
    if lay.fused:
        lay.hidden_norm.weight.data.copy_(last.attn_norm.float())
    if head.norm is not None:
        head.norm.weight.data.copy_(target.norm.float())
    if head.fc is not None:
        n_in = head.fc.in_features // H
        head.fc.weight.data.zero_()
        if cfg.kind == "eagle1":  # [embedding | feature] -> feature
            head.fc.weight.data[:, H:] = torch.eye(H)
        else:  # the highest hidden state through, the others to learn
            head.fc.weight.data[:, (n_in - 1) * H :] = torch.eye(H)
            head.fc.weight.data[:, : (n_in - 1) * H].normal_(0, 0.01)
        if head.fc.bias is not None:
            head.fc.bias.data.zero_()
    return head


def batches(seqs, seq_len: int, batch_tokens: int, rng: random.Random):
    """Endless windows of at most ``seq_len`` positions, grouped to ~``batch_tokens``."""
    while True:
        order = list(range(len(seqs)))
        rng.shuffle(order)
        group, size = [], 0
        for i in order:
            n = seqs[i]["ids"].shape[0]
            lo = rng.randrange(0, max(1, n - seq_len + 1))
            group.append((i, lo, min(n, lo + seq_len)))
            size += group[-1][2] - lo
            if size >= batch_tokens:
                yield group
                group, size = [], 0


def drafted_logits(head, seq: dict, lo: int, hi: int, t2d: torch.Tensor, steps: int):
    """Per drafting step j, the head's logits [T, Vd] at every position of the window
    ``lo:hi`` of ``seq`` and what the target wrote there as draft ids [T] (-100: nothing to
    learn); None for a window too short to draft in. EAGLE-style heads are unrolled ``steps``
    steps (``EagleHead.unrolled``); Medusa's heads each give one step."""
    ids = seq["ids"][lo:hi].long()
    n = ids.shape[0]
    if n < 2:
        return None
    T = n - 1
    pad = max(steps, head.cfg.blocks)
    labels_t = seq["argmax"][lo:hi].long()
    # lab[k] = y_{k+1} as a draft id; -100 outside the draft vocabulary or unknown (-1: a prompt
    # position of features captured while answering, where the target's own token was not computed)
    lab = torch.where(labels_t[1:] >= 0, t2d[labels_t[1:].clamp(min=0)], -100)
    lab = torch.cat([lab, torch.full((pad,), -100, dtype=torch.long)])
    tok = torch.cat([ids[1:], torch.zeros(pad, dtype=torch.long)])
    feats = head.fuse(seq["hidden"][lo:hi].float()[:T])
    if isinstance(head, MedusaHead):
        logits = head(feats)  # [T, blocks, Vd]; head j predicts y_{i+j+1}
        outs = [logits[:, j] for j in range(logits.shape[1])]
    else:
        outs = [o[0] for o in head.unrolled(feats[None], tok[None, : T + steps - 1], steps)]
    return outs, [lab[j : j + T] for j in range(len(outs))]


def sequence_loss(head, seq: dict, lo: int, hi: int, t2d: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[float], int]:
    """The unrolled loss of one window (summed over positions, step j weighted 0.8^j), per step
    accuracy counts, and the positions."""
    got = drafted_logits(head, seq, lo, hi, t2d, steps)
    if got is None:
        return torch.zeros(()), [0.0] * steps, 0
    outs, targets = got
    total = sum(F.cross_entropy(lg, t, ignore_index=-100, reduction="sum") * (0.8**j)
                for j, (lg, t) in enumerate(zip(outs, targets)))  # fmt: skip
    correct = [float(((lg.argmax(-1) == t) & (t >= 0)).sum()) for lg, t in zip(outs, targets)]
    return total, correct, targets[0].shape[0]


def train_head(head, seqs, settings: TrainSettings, folder: Path, deadline: float) -> dict:
    """AdamW, warm-up and cosine decay over the steps the time left allows (estimated from the
    first steps), checkpointing to ``folder/checkpoint.pt``."""
    rng = random.Random(settings.seed)
    vocab = head.d2t + torch.arange(len(head.d2t))
    t2d = torch.full((head.cfg.vocab_size,), -100, dtype=torch.long)
    t2d[vocab] = torch.arange(len(vocab))
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ckpt = folder / "checkpoint.pt"
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "total_steps": None, "curve": []}
    if ckpt.is_file():
        saved = torch.load(str(ckpt), map_location="cpu", weights_only=False)
        head.load_state_dict(saved["head"], strict=False)
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
    # Drafting steps trained: EAGLE heads' training-time test; SpecDec's block; Medusa's heads.
    steps = head.cfg.blocks if head.cfg.kind in ("specdec", "medusa") else settings.ttt_steps
    # A few sequences held out from training: the head kept is the one that agrees with the
    # target best on them (the data is small; past a few epochs a head memorises it), and
    # training stops when that stops improving.
    val_every, patience = 20, 6
    held = sorted(random.Random(settings.seed + 7).sample(range(len(seqs)), max(1, len(seqs) // 20))) if len(seqs) > 20 else []
    val = [seqs[i] for i in held]
    seqs = [s for i, s in enumerate(seqs) if i not in set(held)]
    best = state.get("best") or {"score": -1.0, "step": 0}
    total_data = sum(s["ids"].shape[0] for s in seqs)
    budget_tokens = settings.max_tokens
    it = batches(seqs, settings.seq_len, settings.batch_tokens, rng)
    for _ in range(state["step"]):  # the same data order after a resume
        next(it)
    last_save = time.time()
    bar = _bar(None, "train")
    head.train()
    while True:
        now = time.time()
        if now >= deadline or (budget_tokens and state["tokens"] >= budget_tokens):
            break
        if state["total_steps"] is None and state["step"] == 5:
            per_step = state["seconds"] / 5
            left = deadline - now
            by_time = state["step"] + int(left / per_step)
            by_tokens = int(budget_tokens / (state["tokens"] / 5)) if budget_tokens else by_time
            state["total_steps"] = max(10, min(by_time, by_tokens))
        total = state["total_steps"] or 10**6
        warm = max(5, total // 20)
        s = state["step"]
        lr = settings.lr * (min(1.0, (s + 1) / warm)) * (0.5 * (1 + math.cos(math.pi * min(1.0, s / total))) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.time()
        opt.zero_grad(set_to_none=True)
        loss_sum, n_pos, correct = 0.0, 0, None
        for i, lo, hi in next(it):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.dtype == "bfloat16"):
                loss, corr, T = sequence_loss(head, seqs[i], lo, hi, t2d, steps)
            (loss / settings.batch_tokens).backward()
            loss_sum += float(loss.detach())
            n_pos += T
            correct = corr if correct is None else [a + b for a, b in zip(correct, corr)]
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        state["step"] += 1
        state["tokens"] += n_pos
        state["seconds"] += time.time() - t0
        acc = [round(c / max(n_pos, 1), 4) for c in (correct or [])]
        state["curve"].append({"step": state["step"], "tokens": state["tokens"], "loss": round(loss_sum / max(n_pos, 1), 4),
                               "accuracy": acc, "lr": lr})  # fmt: skip
        bar.update(n_pos)
        bar.set_postfix(loss=f"{loss_sum / max(n_pos, 1):.3f}", acc="/".join(f"{a:.2f}" for a in acc), epoch=f"{state['tokens'] / total_data:.1f}")
        if val and state["step"] % val_every == 0:
            t_val = time.time()
            score = validate(head, val, t2d, steps, settings)
            state["seconds"] += time.time() - t_val
            state["curve"][-1]["validation"] = score
            if score > best["score"]:
                best = {"score": score, "step": state["step"]}
                torch.save(head.state_dict(), str(folder / "best.pt"))
            state["best"] = best
            if state["step"] - best["step"] >= patience * val_every:
                break  # no better on held-out sequences for a while: it is memorising
        if time.time() - last_save > 180:
            torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "state": state}, str(ckpt))
            last_save = time.time()
    bar.close()
    head.eval()
    torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "state": state}, str(ckpt))
    if val and (folder / "best.pt").is_file():
        head.load_state_dict(torch.load(str(folder / "best.pt"), map_location="cpu", weights_only=True), strict=False)
    (folder / "loss_curve.json").write_text(json.dumps(state["curve"]) + "\n")
    return {"steps": state["step"], "tokens": state["tokens"], "seconds": round(state["seconds"], 1),
            "epochs": round(state["tokens"] / max(total_data, 1), 2),
            "final_accuracy": state["curve"][-1]["accuracy"] if state["curve"] else [],
            "best_validation": best, "validation_sequences": len(val)}  # fmt: skip


@torch.no_grad()
def validate(head, val: list[dict], t2d: torch.Tensor, steps: int, settings: TrainSettings) -> float:
    """Expected accepted draft tokens on held-out sequences under a chain of ``steps``: the
    sum over depths of the share of positions whose first d steps all agree with the target."""
    head.eval()
    agree_all, positions = torch.zeros(steps), 0
    for seq in val:
        n = min(seq["ids"].shape[0], settings.seq_len)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.dtype == "bfloat16"):
            hits = chain_hits(head, seq, 0, n, t2d, steps)
        if hits is None:
            continue
        agree_all += hits.cumprod(dim=0).sum(dim=1)
        positions += hits.shape[1]
    head.train()
    return round(float(agree_all.sum()) / max(positions, 1), 4)


def chain_hits(head, seq: dict, lo: int, hi: int, t2d: torch.Tensor, steps: int) -> torch.Tensor | None:
    """[steps, T] (float): whether step j's top token at position i is the target's own (its
    label known and in the draft vocabulary)."""
    if seq["ids"][lo:hi].shape[0] < steps + 2:
        return None
    outs, targets = drafted_logits(head, seq, lo, hi, t2d, steps)
    return torch.stack([((lg.argmax(-1) == t) & (t >= 0)).float() for lg, t in list(zip(outs, targets))[:steps]])


# ---- the pipeline --------------------------------------------------------------------------------
def share_data(source: Path, folder: Path) -> None:
    """Start ``folder`` from ``source``'s data (prompts, answers, features: linked, not copied),
    with their phases done and the seconds they cost counted, so that a head of another kind
    trains on the same data and its report still says what the data cost."""
    if (folder / "state.json").is_file():
        return  # already started (a resume)
    theirs = State(source)
    if not theirs.done("features"):
        raise InvalidArgument("data_from", f"{str(source)!r} has no finished features phase to reuse")
    for name in ("prompts.json", "answers.jsonl", "features"):
        (folder / name).symlink_to((source / name).resolve())
    ours = State(folder)
    for phase in ("prompts", "answers", "features"):
        ours.add(phase, theirs.data["seconds"].get(phase, 0.0))
        ours.finish(phase, **theirs.data.get("info", {}).get(phase, {}), reused_from=str(source))

def run(settings: TrainSettings, progress: bool = True) -> dict:
    """All phases (see the module docstring); returns the report."""
    from ..engine import Engine

    settings.check()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    folder = Path(settings.out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    if settings.data_from:
        share_data(Path(settings.data_from).expanduser(), folder)
    state = State(folder)
    spent = state.spent()
    if not state.done("train") and (folder / "checkpoint.pt").is_file():  # a training killed midway counts too
        spent += torch.load(str(folder / "checkpoint.pt"), map_location="cpu", weights_only=False)["state"]["seconds"]
    start = time.time() - spent
    deadline = start + settings.time_budget
    engine = Engine.from_pretrained(settings.model, method=settings.method, progress=progress)
    target, tok = engine.target, engine.tokenizer
    if not hasattr(target, "layers"):
        raise InvalidArgument("model", "train-drafter reads hidden states through the native backend; this model loads with hf")

    # 1. prompts
    pfile = folder / "prompts.json"
    t = time.time()
    if not state.done("prompts"):
        prompts = read_prompts(settings.prompts) if settings.prompts else []
        random.Random(settings.seed).shuffle(prompts)
        if settings.max_prompts:
            prompts = prompts[: settings.max_prompts]
        if settings.synthesize:
            prompts += synthesize_prompts(engine, settings.synthesize, settings.seed, settings.max_num_seqs,
                                          start + settings.prompts_share * settings.time_budget)  # fmt: skip
            random.Random(settings.seed + 1).shuffle(prompts)
        prompts = list(dict.fromkeys(prompts))
        pfile.write_text(json.dumps({"train": prompts[HELD_OUT:], "held_out": prompts[:HELD_OUT]}, indent=1))
        state.add("prompts", time.time() - t)
        state.finish("prompts", count=len(prompts))
    split = json.loads(pfile.read_text())

    # 2. answers (greedy, exact), until their share of the budget. Every kind's hidden states
    # (EAGLE-3's three and the last) are kept, so that heads of other kinds can train on the same
    # data (--data-from) paying for training alone.
    L = target.num_layers
    layers = tuple(sorted(set(eagle3_layers(L)) | {L}))
    answers_path = folder / "answers.jsonl"
    done = [json.loads(line) for line in answers_path.read_text().splitlines()] if answers_path.is_file() else []
    if not state.done("answers"):
        todo = split["train"][len(done):]
        stop_at = start + settings.answers_share * settings.time_budget
        bar = _bar(None, "answers")
        chunk = 2 * settings.max_num_seqs
        sink: list = []
        answering = engine
        if settings.capture:  # the features from the answering forwards themselves
            answering = engine.with_method(settings.method)
            answering.drafter = FeatureRecorder(answering.drafter, layers, sink)
            (folder / "features").mkdir(exist_ok=True)
        with answers_path.open("a") as f:
            for i in range(0, len(todo), chunk):
                if time.time() >= stop_at:
                    break
                t = time.time()
                part = [chat_ids(tok, p) for p in todo[i : i + chunk]]
                results = answering.generate_batch(part, max_new_tokens=settings.answer_tokens, max_num_seqs=settings.max_num_seqs)
                if settings.capture:
                    base = len(done) + i
                    shard = {f"{base + k}.{what}": v for k, (tokens, plen, hidden) in enumerate(sink)
                             for what, v in captured_record(tokens, plen, hidden).items()}  # fmt: skip
                    save_file(shard, str(folder / "features" / f"features-{base:07d}.safetensors"))
                    lines = [{"ids": tokens, "prompt_tokens": plen} for tokens, plen, _ in sink]
                    sink.clear()
                else:
                    lines = [{"ids": ids + list(r.token_ids), "prompt_tokens": len(ids)} for ids, r in zip(part, results)]
                for line in lines:
                    f.write(json.dumps(line) + "\n")
                    bar.update(len(line["ids"]) - line["prompt_tokens"])
                f.flush()
                state.add("answers", time.time() - t)
        bar.close()
        done = [json.loads(line) for line in answers_path.read_text().splitlines()]
        state.finish("answers", conversations=len(done), tokens=sum(len(d["ids"]) for d in done),
                     answer_tokens=sum(len(d["ids"]) - d["prompt_tokens"] for d in done), captured=settings.capture)  # fmt: skip

    # 3. features (unless captured while answering)
    cfg = HeadConfig.for_target(target, settings.kind, draft_vocab_size=None, blocks=settings.blocks)
    if not state.done("features") and settings.capture:
        state.finish("features", tokens=sum(len(d["ids"]) for d in done), layers=list(layers), captured=True)
    if not state.done("features"):
        t = time.time()
        extract_features(target, [d["ids"] for d in done], layers, folder / "features")
        state.add("features", time.time() - t)
        state.finish("features", tokens=sum(len(d["ids"]) for d in done), layers=list(layers))
    pick = [layers.index(i) for i in cfg.target_layers]
    seqs = [{"ids": s["ids"], "argmax": s["argmax"], "hidden": s["hidden"][:, pick]} for s in load_features(folder / "features")]

    # 4. train
    vocab = draft_vocabulary(seqs, cfg.vocab_size, settings.draft_vocab)
    cfg = HeadConfig.for_target(target, settings.kind, draft_vocab_size=len(vocab) if len(vocab) < cfg.vocab_size else None,
                                blocks=settings.blocks)  # fmt: skip
    head = new_head(target, cfg, vocab)
    if not state.done("train"):
        t = time.time()
        report_reserve = min(300.0, 0.08 * settings.time_budget)
        info = train_head(head, seqs, settings, folder, deadline - report_reserve)
        state.add("train", max(info["seconds"], time.time() - t))  # all of training, earlier runs' included
        state.finish("train", **info)
    else:
        saved = torch.load(str(folder / "checkpoint.pt"), map_location="cpu", weights_only=False)
        head.load_state_dict(saved["head"], strict=False)
    # The float32 copies of the target's embedding and lm_head that training read are not saved
    # (save_head writes parameters and buffers): dropped here, before the report loads the head.
    head.embed = head.target_lm_head = None
    head_dir = folder  # the head beside its work files: `-o drafter=OUT` takes the folder itself
    save_head(head.eval(), head_dir, extra={"trained": state.data.get("info", {})})

    # 5. report
    report = held_out_report(engine, head_dir, split["held_out"], settings)
    report["phases"] = {k: round(v, 1) for k, v in state.data["seconds"].items()}
    report["info"] = state.data.get("info", {})
    report["peak_rss_gib"] = round(peak_rss_gib(), 2)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(report_markdown(report, settings))
    return report


METHOD_OF_KIND = {"eagle3": "eagle", "eagle1": "eagle", "medusa": "medusa", "specdec": "specdec-drafter"}


def held_out_report(engine, head_dir: Path, prompts: list[str], settings: TrainSettings, budget: int = 16) -> dict:
    """Decode the held-out prompts with the head, greedy, every draft ``budget`` nodes (the
    head's quality, apart from the cost model's cut): mean accepted tokens per step (tokens
    emitted per target forward) and acceptance by depth (the share of steps whose accepted path
    reached depth d)."""
    eng = engine.with_method(METHOD_OF_KIND[settings.kind], drafter=str(head_dir), sizing="fixed", draft_length=budget)
    lengths: list[int] = []
    t = time.time()
    for p in prompts:
        r = eng.generate(chat_ids(eng.tokenizer, p), max_new_tokens=128)
        lengths += r.stats.accept_lengths
    seconds = time.time() - t
    steps = max(len(lengths), 1)
    depth = [round(sum(n - 1 >= d for n in lengths) / steps, 3) for d in range(1, 9)]
    return {"held_out_prompts": len(prompts), "draft_budget": budget, "mean_accepted_tokens": round(sum(lengths) / steps, 3),
            "acceptance_by_depth": depth, "tokens_per_second": round(sum(lengths) / seconds, 2)}  # fmt: skip


def report_markdown(report: dict, settings: TrainSettings) -> str:
    lines = [f"# Draft head: {settings.kind} for {settings.model}", "",
             f"- mean accepted tokens per step (held-out, greedy, 128 new tokens): **{report['mean_accepted_tokens']}**",
             f"- acceptance by depth 1..8: {report['acceptance_by_depth']}",
             f"- held-out decoding speed: {report['tokens_per_second']} tok/s", f"- peak RSS: {report['peak_rss_gib']} GiB", "",
             "| phase | seconds | what |", "|---|---|---|"]  # fmt: skip
    for phase, sec in report["phases"].items():
        lines.append(f"| {phase} | {sec} | {json.dumps(report['info'].get(phase, {}))} |")
    return "\n".join(lines) + "\n"
