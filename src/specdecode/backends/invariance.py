"""Row invariance of linear kernels: the property that makes speculation bit-exact in bf16.

A token's logits in a verification block must be bit for bit what plain decoding computes for
it alone, or speculative decoding drifts from plain decoding by rounding. Attention is computed
row by row (native.py), so the open question is the matrix products: does row i of ``x @ W.T``
depend on how many rows ``x`` has? CPU kernels keep each row's arithmetic for small row counts,
but switch blocking or algorithm above a size that depends on the shape, the instruction set
(AVX-512 with or without AMX) and the library version; seen: Qwen's 8960 -> 1536 at 12 rows on
an Intel Xeon, SmolLM2's 576 -> 1536 at 8 rows on an AMD EPYC.

A difference in accumulation order shows in a bf16 output only when a value lands near a
rounding boundary, which is rare, and rarer still with weights that went through a quantized
format (few distinct values, many exact partial sums). So one random probe can pass a kernel
that is not invariant. This check uses several probes per row count (the model's real
activations where the caller captured them, and random inputs at the same scale), every row
count a verification block can have (1 .. ROWWISE_MAX_BLOCK), and the real weights. The result
is a chunk size per linear: blocks are cut into chunks of at most that many rows, each of which
the kernel computes exactly as it computes rows alone.

Results are kept per linear role (``NativeBackend.row_checks``, shown by ``specdecode doctor``) and cached on disk
keyed by the CPU model, the torch and oneDNN versions, the kernel and a fingerprint of the
weights, so a model loads quickly the second time on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# Blocks up to this many tokens (decoding steps, verification of drafts) attend row by row and
# have their linears cut into invariant chunks; longer blocks (prefill) need no invariance.
ROWWISE_MAX_BLOCK = 32
# Random probes per row count, besides the captured activations.
RANDOM_PROBES = 3
# Bump when the check itself changes, so cached results from an older check are not trusted.
CHECK_VERSION = 3


@dataclass
class RowCheck:
    """What the check found for one linear (one kernel, one weight)."""

    name: str  # e.g. "layers.*.gate_up" (linears of one shape and role share a line)
    shape: tuple[int, int]  # (out_features, in_features)
    dtype: str
    kernel: str  # "onednn-packed", "torch", or a quantized kernel's name
    invariant_rows: int  # largest m: every probe of 1..m rows equals the rows done alone
    pad_rows: int  # single rows and short chunks are computed in products of this many rows
    chunk_rows: int  # blocks of up to ROWWISE_MAX_BLOCK rows are cut into chunks of this many
    exact: bool  # whether verification rows are then bit-identical to decoding rows
    probes: int  # products compared per row count
    cached: bool = False

    @property
    def reason(self) -> str:
        if self.exact:
            how = []
            if self.pad_rows > 1:
                how.append(f"rows padded to {self.pad_rows}")
            if self.chunk_rows < ROWWISE_MAX_BLOCK:
                how.append(f"blocks cut into chunks of {self.chunk_rows}")
            return ", ".join(how) or "row-invariant as it is"
        return "float32 kernel not row-invariant: left whole, exact up to float32 rounding"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8", "asimd", "sve", "bf16", "i8mm")  # fmt: skip


def cpu_flags() -> list[str]:
    """The instruction-set extensions that decide which kernels run (x86 and Arm)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.split(":", 1)[1].split())
                return [f for f in ISA_FLAGS if f in present]
    except OSError:
        pass
    return []


def onednn_version() -> str:
    for line in torch.__config__.show().splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            return line.strip(" -").split(" (")[0]
    return "none"


def machine_key(device: torch.device) -> str:
    """What a kernel's behaviour depends on besides the shape: the chip and the libraries."""
    if device.type == "cuda":
        chip = f"{torch.cuda.get_device_name(device)}|cuda {torch.version.cuda}"
    else:
        chip = f"{cpu_model()}|{' '.join(cpu_flags())}|{torch.backends.cpu.get_cpu_capability()}"
    return f"{chip}|torch {torch.__version__}|{onednn_version()}|threads {torch.get_num_threads()}"


def _cache_file() -> Path:
    root = os.environ.get("SPECDECODE_CACHE") or Path.home() / ".cache" / "specdecode"
    return Path(root) / "row_invariance.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(entries: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs a re-check next time


def weight_fingerprint(weight: torch.Tensor) -> str:
    """A cheap digest of a weight: its shape and a strided sample of its values."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // 65536)
    sample = flat[::step].to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(weight.shape)).encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# Row counts a single row (a decoding step) may be padded to, tried in order.
PAD_CHOICES = (1, 2, 4)


def _padded_rows(apply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, pad: int) -> torch.Tensor:
    """Each row of ``x`` computed alone, in a product of ``pad`` rows (copies of itself)."""
    return torch.cat([apply(x[i : i + 1].expand(pad, -1).contiguous())[:1] for i in range(x.shape[0])])


def _consistent_up_to(apply, probes: list[torch.Tensor], pad: int) -> int:
    """Largest c >= pad such that, for every probe, every product of ``pad``..c rows gives each
    row exactly as its padded product alone does (pad - 1 if even ``pad`` rows fail)."""
    best = ROWWISE_MAX_BLOCK
    for x in probes:
        alone = _padded_rows(apply, x, pad)
        for m in range(pad, best + 1):
            if not torch.equal(apply(x[:m]), alone[:m]):
                best = m - 1
                break
        if best < pad:
            break
    return best


@torch.inference_mode()
def row_plan(apply: Callable[[torch.Tensor], torch.Tensor], probes: list[torch.Tensor]) -> tuple[int, int]:
    """(pad, chunk): products of ``pad``..``chunk`` rows compute every row alike, so a decoding
    step padded to ``pad`` rows and verification blocks cut into chunks of at most ``chunk``
    rows (each padded to ``pad``) give each token bit for bit the same output.

    Padding exists because some kernels take one path for a single row (a matrix-vector
    product) and another, consistent one for 2+ rows (seen: SmolLM2's 1536 -> 576 projection,
    not invariant even for 2 rows without it, invariant up to 32 with single rows padded to 2).
    On a memory-bound machine a 2-row product costs about what a 1-row product does. The
    plan with the largest chunk wins, the smallest padding among equals. (1, 1) if none is
    consistent beyond single rows."""
    best = (1, 1)
    for pad in PAD_CHOICES:
        chunk = _consistent_up_to(apply, probes, pad)
        if chunk >= pad and chunk > best[1]:
            best = (pad, chunk)
        if best[1] == ROWWISE_MAX_BLOCK:
            break
    return best


def invariant_rows(apply: Callable[[torch.Tensor], torch.Tensor], probes: list[torch.Tensor]) -> int:
    """Largest m such that products of 1..m rows give each row as it is alone (no padding)."""
    with torch.inference_mode():
        return max(1, _consistent_up_to(apply, probes, 1))


def make_probes(
    in_features: int,
    dtype: torch.dtype,
    device: torch.device,
    activations: torch.Tensor | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Inputs for ``invariant_rows``: the captured activations (if any, ROWWISE_MAX_BLOCK rows of
    them) and RANDOM_PROBES random inputs, scaled like the activations per feature (unit normal
    without them)."""
    g = torch.Generator().manual_seed(seed)
    probes: list[torch.Tensor] = []
    scale: torch.Tensor | float = 1.0
    if activations is not None and activations.shape[0] >= 2:
        act = activations.detach().to("cpu", torch.float32)
        scale = act.std(dim=0).clamp_min(1e-3)
        rows = act[torch.arange(ROWWISE_MAX_BLOCK) % act.shape[0]]
        probes.append(rows.to(device, dtype))
    for _ in range(RANDOM_PROBES):
        x = torch.randn(ROWWISE_MAX_BLOCK, in_features, generator=g) * scale
        probes.append(x.to(device, dtype))
    return probes


def check_linear(
    apply: Callable[[torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    *,
    name: str,
    kernel: str,
    dtype: torch.dtype,
    activations: torch.Tensor | None = None,
    use_cache: bool = True,
    fingerprint: str | None = None,
) -> RowCheck:
    """Check one linear (``apply``: x -> x W^T + b with this weight and kernel).

    ``fingerprint``: the weight's digest, where the caller has one and ``weight`` is only a
    stand-in of the right shape and device (a quantized weight, whose plain form is not kept).

    Chunking is the price of exactness, paid wherever a kernel needs it: a kernel that is
    invariant for m rows gets chunks of m, down to single rows in bf16/fp16 (verification then
    costs more, and the engine's payoff sizing sees that). Only a float32 kernel that is not
    invariant even for 2 rows (CPU float32 products) is left whole: we promise bit-exactness in
    bf16; in float32 speculation equals plain decoding up to float32 rounding.
    """
    device = weight.device
    key = "|".join(
        [f"v{CHECK_VERSION}", machine_key(device), kernel, str(dtype), str(tuple(weight.shape)),
         fingerprint or weight_fingerprint(weight)]
    )  # fmt: skip
    cache = _load_cache() if use_cache else {}
    cached = key in cache
    if cached:
        rows, pad, chunk = cache[key]
    else:
        probes = make_probes(weight.shape[1], dtype, device, activations)
        rows = invariant_rows(apply, probes)
        pad, chunk = (1, rows) if rows == ROWWISE_MAX_BLOCK else row_plan(apply, probes)
        if use_cache:
            cache = _load_cache()
            cache[key] = [rows, pad, chunk]
            _save_cache(cache)
    exact = chunk >= 2 or dtype != torch.float32
    if not exact:
        pad, chunk = 1, ROWWISE_MAX_BLOCK
    result = RowCheck(
        name=name, shape=tuple(weight.shape), dtype=str(dtype).replace("torch.", ""), kernel=kernel,
        invariant_rows=rows, pad_rows=pad, chunk_rows=chunk, exact=exact,
        probes=RANDOM_PROBES + (activations is not None), cached=cached,
    )  # fmt: skip
    return result
