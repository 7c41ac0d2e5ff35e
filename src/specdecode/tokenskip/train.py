"""``tokenskip train``: LoRA SFT with peft on the compressed chains of thought.

The data (TokenSkip's get_llamafactory_input.py): one example per kept problem, its ratio gamma
drawn with ``random.Random(seed)`` from {1.0} + the compressed ratios (1.0: the original chain);
input = ``tokenskip_prompt(question, gamma)``, target = ``sft_output(chain, answer)`` + EOS; the
loss is on the target only; examples longer than ``cutoff`` (2048) tokens are cut.

Training (the paper's LLaMA-Factory config): LoRA on every linear layer but the output layer,
rank 8, alpha 16, dropout 0, AdamW lr 5e-5, cosine schedule with 10% linear warm-up, batch 1 x
gradient accumulation 8, 3 epochs; examples shuffled per epoch (seed + epoch). Plain PyTorch,
on whatever device the model is on (``--device cpu|cuda``); on CUDA the base is bfloat16 and
the adapter float32 (peft's default), on CPU all float32.

Resumable: every ``save_every`` optimizer steps (and at each epoch's end) a checkpoint (the
adapter in peft's format, optimizer, scheduler, step, losses) replaces the last one, written
to a temporary folder and renamed; a rerun continues from it at the same example. The result:
``out/adapter/`` (adapter_config.json, adapter_model.safetensors, loss.json, loss.png).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

from ..errors import InvalidArgument
from .compress import COMPRESS_FILE
from .prompts import format_ratio, sft_output, tokenskip_prompt
from .runs import check_positive, check_settings, model_label, progress_bar
from .store import read_rows

SFT_FILE = "sft.jsonl"


def build_sft(rows: list[dict], *, seed: int = 42, ratios: list[float] | None = None) -> list[dict]:
    """One example per compressed row (in index order): {index, ratio, question, output}.
    ``ratios``: the gammas to draw from (default: 1.0 and every ratio the rows have)."""
    rows = sorted(rows, key=lambda r: r["index"])
    if ratios is None:
        have = sorted({float(k) for r in rows for k in r["compressed"]}, reverse=True)
        ratios = [1.0] + [g for g in have if g < 1.0]
    rng = random.Random(seed)
    out = []
    for r in rows:
        gamma = rng.choice(ratios)
        if gamma == 1.0:
            cot = r["cot"]
        else:
            key = format_ratio(gamma)
            if key not in r["compressed"]:
                raise InvalidArgument("ratios", f"problem {r['index']} has no chain compressed to {key}")
            cot = r["compressed"][key]["text"]
        out.append({"index": r["index"], "ratio": gamma, "question": r["question"], "output": sft_output(cot, r["answer"])})
    return out


def tokenize_example(tokenizer, example: dict, cutoff: int = 2048) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt (labels -100) then the target and EOS (labels = ids)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidArgument("model", "its tokenizer has no EOS token, which ends every training target")
    prompt = tokenskip_prompt(tokenizer, example["question"], example["ratio"])
    target = list(tokenizer(example["output"], add_special_tokens=False)["input_ids"]) + [int(eos)]
    ids = (prompt + target)[:cutoff]
    labels = ([-100] * len(prompt) + target)[:cutoff]
    return ids, labels


def _plot(losses: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x["step"] for x in losses], [x["loss"] for x in losses], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("TokenSkip LoRA SFT")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def train(model: str, out: str, *, epochs: float = 3, lr: float = 5e-5, rank: int = 8, alpha: int = 16,
          dropout: float = 0.0, grad_accum: int = 8, warmup: float = 0.1, cutoff: int = 2048, seed: int = 42,
          save_every: int = 50, max_steps: int | None = None, limit: int | None = None, device: str = "cpu",
          dtype: str = "auto", gradient_checkpointing: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict:  # fmt: skip
    """Train (or resume) the adapter in ``out/adapter`` from ``out/compressed.jsonl``.
    ``stop_after``: return after this many optimizer steps of this call (a checkpoint is saved):
    the tests' stand-in for a kill."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    from ..hub import resolve_model
    from ..loading import load_tokenizer, parse_dtype

    for name, v in (("rank", rank), ("alpha", alpha), ("grad_accum", grad_accum), ("cutoff", cutoff), ("save_every", save_every)):
        check_positive(name, v)
    if not (isinstance(epochs, (int, float)) and epochs > 0):
        raise InvalidArgument("epochs", f"expected a positive number, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise InvalidArgument("lr", f"expected a positive learning rate, got {lr!r}")
    if not (0 <= warmup < 1):
        raise InvalidArgument("warmup", f"expected a warm-up fraction in [0, 1), got {warmup!r}")
    if not (0 <= dropout < 1):
        raise InvalidArgument("dropout", f"expected a dropout in [0, 1), got {dropout!r}")
    if max_steps is not None:
        check_positive("max_steps", max_steps)
    out_dir = Path(out)
    source = out_dir / COMPRESS_FILE
    if not source.exists():
        raise InvalidArgument("out", f"{str(out_dir)!r} has no {COMPRESS_FILE}: run `specdecode tokenskip compress --out {out}` first")
    adapter_dir = out_dir / "adapter"
    rows = read_rows(source)
    if not rows:
        raise InvalidArgument("out", f"{str(source)!r} holds no compressed chains")
    examples = build_sft(rows, seed=seed)
    if limit is not None:
        examples = examples[: check_positive("limit", limit)]
    with (out_dir / SFT_FILE).open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    settings = {"model": model_label(model), "epochs": epochs, "lr": lr, "rank": rank, "alpha": alpha, "dropout": dropout,
                "grad_accum": grad_accum, "warmup": warmup, "cutoff": cutoff, "seed": seed, "examples": len(examples),
                "max_steps": max_steps}  # fmt: skip
    check_settings(out_dir / "train_settings.json", settings, "train")
    if (adapter_dir / "train_summary.json").exists():  # trained already with these settings
        return json.loads((adapter_dir / "train_summary.json").read_text())

    base = resolve_model(str(model), progress=progress)
    tokenizer = load_tokenizer(base)
    data = [tokenize_example(tokenizer, e, cutoff) for e in examples]
    torch_dtype = parse_dtype(dtype) or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch_dtype).to(device)
    if gradient_checkpointing:
        net.gradient_checkpointing_enable()
        net.enable_input_require_grads()
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    net = get_peft_model(net, config)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(data) / grad_accum)
    total = math.ceil(steps_per_epoch * epochs)
    if max_steps is not None:
        total = min(total, max_steps)
    sched = get_cosine_schedule_with_warmup(opt, int(round(warmup * total)), total)

    ckpt = out_dir / "checkpoint"
    step, losses, seconds = 0, [], 0.0
    if (ckpt / "state.pt").exists():
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        set_peft_model_state_dict(net, load_file(str(ckpt / "adapter_model.safetensors"), device=str(net.device)))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, losses, seconds = state["step"], state["losses"], state["seconds"]
        print(f"resuming from {ckpt} at optimizer step {step}/{total}", file=sys.stderr)

    def save_checkpoint() -> None:
        tmp = out_dir / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        net.save_pretrained(str(tmp))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "losses": losses,
                    "seconds": seconds}, tmp / "state.pt")  # fmt: skip
        old = out_dir / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if ckpt.exists():
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        shutil.rmtree(old, ignore_errors=True)

    def order(epoch: int) -> list[int]:
        idx = list(range(len(data)))
        random.Random(seed + epoch).shuffle(idx)
        return idx

    net.train()
    bar = progress_bar(total, "train", progress, initial=step)
    done_this_call = 0
    while step < total:
        epoch, group = divmod(step, steps_per_epoch)
        idx = order(epoch)[group * grad_accum : (group + 1) * grad_accum]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        group_loss = 0.0
        for i in idx:
            ids, labels = data[i]
            x = torch.tensor([ids], device=net.device)
            y = torch.tensor([labels], device=net.device)
            loss = net(input_ids=x, labels=y).loss / len(idx)
            loss.backward()
            group_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        done_this_call += 1
        seconds += time.perf_counter() - t0
        losses.append({"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": group_loss, "lr": sched.get_last_lr()[0]})
        bar.update(1)
        bar.set_postfix(loss=f"{group_loss:.4f}")
        if step % save_every == 0 or step % steps_per_epoch == 0 or step == total:
            save_checkpoint()
        if stop_after is not None and done_this_call >= stop_after and step < total:
            save_checkpoint()
            bar.close()
            return {"stopped_at_step": step, "total_steps": total}
    bar.close()

    tmp = out_dir / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(str(tmp))
    (tmp / "loss.json").write_text(json.dumps(losses, indent=0))
    plotted = _plot(losses, tmp / "loss.png")
    summary = {"examples": len(data), "optimizer_steps": total, "epochs": epochs, "seconds": round(seconds, 1),
               "first_loss": losses[0]["loss"] if losses else None, "last_loss": losses[-1]["loss"] if losses else None,
               "ratios": {format_ratio(g): sum(e["ratio"] == g for e in examples) for g in sorted({e["ratio"] for e in examples})},
               "loss_plot": plotted, "base": str(base)}  # fmt: skip
    (tmp / "train_summary.json").write_text(json.dumps(summary, indent=1))
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    os.replace(tmp, adapter_dir)
    return summary
