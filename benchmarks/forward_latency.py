"""Latency of one forward of T new tokens after 200 cached ones: our native backend against
transformers' model with its DynamicCache, same weights, bf16, in one process.

    python benchmarks/forward_latency.py qwen2.5-coder-1.5b [--threads 2]
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from specdecode.backends import NativeBackend
from specdecode.hub import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    native = NativeBackend(path, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    context = torch.randint(0, 1000, (200,))
    native.forward(context, logits_rows=None)
    cache = DynamicCache(config=hf.config)
    with torch.inference_mode():
        hf(context[None], past_key_values=cache, use_cache=True)

    def ours(n: int) -> float:
        t = time.perf_counter()
        for _ in range(args.repeat):
            native.forward(torch.arange(n) + 5)
            native.truncate(200)
        return (time.perf_counter() - t) / args.repeat

    def theirs(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for _ in range(args.repeat):
                hf(torch.arange(n)[None] + 5, past_key_values=cache, use_cache=True)
                cache.crop(-n)
        return (time.perf_counter() - t) / args.repeat

    print("| T | native | transformers |\n|---|---|---|")
    for n in (1, 1, 4, 8, 16):  # the first T=1 row includes warm-up
        print(f"| {n} | {ours(n) * 1e3:.1f} ms | {theirs(n) * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
