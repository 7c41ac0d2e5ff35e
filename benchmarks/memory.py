r"""Memory of specdecode against its peers: resident set size (RSS) at load and after a short
generation, per configuration, each in a fresh process (issue 23).

Configurations (rows):

* ``generate M``        our Python API, ``Engine.from_pretrained(model, method=M, dtype="bfloat16")``
                        then ``.generate(prompt, max_new_tokens=N)``, for each M of ``--methods``
                        (and, with ``--quantize int4``, again with the model itself quantized);
* ``serve S``           ``specdecode serve --max-num-seqs 8 --method S`` on 127.0.0.1 (a free port),
                        read after /health answers, then after ``--concurrency`` concurrent chat
                        requests of ~``--conversation-tokens`` tokens each (long multi-turn
                        conversations built from a fixed, deterministic text), for each S of
                        ``--serve-methods``;
* ``transformers``      the peer: ``AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)``
                        then ``model.generate`` on the same prompt ids (greedy, N new tokens);
* ``llama.cpp T``       ``llama-completion`` (or ``llama-cli``) on the GGUF files that
                        ``benchmarks/llama_cpp.sh`` writes (``BF16``, ``Q4_K_M``), when
                        ``--llama-cpp DIR`` (its work folder or a folder of binaries) has them;
                        skipped with the reason otherwise. llama.cpp prints no moment "loaded", so
                        only its lifetime peak and its last sampled RSS are reported.

Columns, read from /proc/PID/status (GiB = 2**30 bytes):

* load peak             VmHWM right after the engine/model is loaded (the process's peak so far)
* steady after load     VmRSS then (after gc.collect())
* peak after generate   VmHWM after the generation: the process's lifetime peak
* steady after generate VmRSS after it
* generate peak         the generation's own peak: VmHWM is reset (``echo 5 > /proc/PID/clear_refs``)
                        after loading, so this is the most the generation itself held
* x transformers        steady after generate / transformers' steady after generate

The JSON also keeps RssAnon / RssFile (what is the process's own memory vs file pages mapped
from the safetensors/GGUF files, which the kernel may drop and re-read), VmSize (address space
reserved, e.g. a KV cache allocated with torch.empty but not yet written), wall times, tokens/s,
and the engine's own accounting (KV cache bytes, quantized bytes). The bf16 bytes of the model's
weights, from its safetensors headers, are given for reference.

    python benchmarks/memory.py --model smollm2-135m --out bench_out/memory
    python benchmarks/memory.py --model qwen2.5-coder-1.5b --methods vanilla,pld --quantize int4 \
        --serve-methods vanilla --llama-cpp bench_out/llama.cpp --out bench_out/memory

Every child process runs in its own session, dies with this one (PR_SET_PDEATHSIG) and is killed
on exit, on Ctrl-C or SIGTERM, on ``--timeout`` and, with ``--rss-limit-gib``, when its RSS passes
that limit (the row then says so).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import ctypes
import gc
import json
import os
import platform
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 2**30
REPO = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = "vanilla,pld,pld+quant"

# The generation prompt: an input-grounded edit (so that pld has something to look up), fixed.
CODE = '''def average(values):
    total = 0
    for v in values:
        total = total + v
    return total / len(values)
'''
PROMPT = f"Add a docstring and type hints to this Python function. Reply with the code only.\n\n{CODE}"

# Text the long conversations are built from (deterministic: shuffled with a fixed seed).
PARAGRAPHS = [
    "The lighthouse keeper, Mara, climbed the one hundred and twelve steps every evening at dusk. She lit "
    "the great lamp, wound the clockwork that turned the lens, and wrote the weather in a leather logbook.",
    "In forty years the light had never once failed, not even in the storm of 1987, when the waves broke "
    "over the gallery and the supply boat could not land for eleven days.",
    "A hash table stores key-value pairs in an array of buckets. A hash function maps each key to a bucket; "
    "collisions are resolved by chaining or by open addressing, and the table grows when its load factor "
    "passes a threshold, so that lookups stay constant time on average.",
    "def merge(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n"
    "            out.append(a[i]); i += 1\n        else:\n            out.append(b[j]); j += 1\n"
    "    return out + a[i:] + b[j:]\n",
    "The village market opened at six. Farmers brought cheese, apples and bread; the baker's daughter sold "
    "honey cakes, and by nine the square smelled of coffee and wet stone.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. The light reactions happen in "
    "the thylakoid membranes; the Calvin cycle fixes carbon in the stroma.",
    "Bug report: the export button does nothing when the table has more than 10,000 rows. Expected: a CSV "
    "file downloads. Actual: the spinner shows for a second, then nothing. Browser console: out of memory.",
    "The committee met on Tuesday to review the budget. Travel costs were cut by twelve percent, the "
    "library received two new positions, and the decision on the roof repair was postponed to March.",
]


# ---- /proc readings -------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem, VmSize of a process, in bytes ({} if it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem", "VmSize", "VmPeak"):
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


def reset_peak(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def safetensors_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the weights if stored in bf16, number of tensors), from the safetensors headers
    only (nothing is loaded)."""
    total = count = 0
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in meta["shape"]:
                numel *= d
            total += numel * 2
            count += 1
    return total, count


# ---- children: one configuration each, in a fresh process ------------------------------------


def _prompt_ids(tokenizer) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    return [int(t) for t in ids]


def child_main(spec: dict, result_path: Path) -> None:
    """Run one configuration in this (fresh) process and write its readings to ``result_path``."""
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    readings: dict = {"imports": proc_status()}
    kind = spec["kind"]
    info: dict = {}
    t0 = time.perf_counter()
    if kind == "generate":
        sys.path.insert(0, str(REPO / "src"))
        import specdecode
        from specdecode import Engine

        info["specdecode"] = specdecode.__file__

        engine = Engine.from_pretrained(spec["model"], method=spec["method"], dtype="bfloat16",
                                        quantize=spec.get("quantize"), progress=False)  # fmt: skip
        ids = _prompt_ids(engine.tokenizer)
        target = engine.target
        info["target_kv_cache_bytes"] = int(getattr(target, "cache_bytes", 0) or 0)
        info["target_quantized_bytes"] = int(getattr(target, "quantized_bytes", 0) or 0)
        info["max_length"] = int(getattr(target, "max_length", 0) or 0)
    elif kind == "transformers":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec["path"])
        model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.bfloat16)
        model.eval()
        ids = _prompt_ids(tokenizer)
    else:
        raise ValueError(kind)
    load_s = time.perf_counter() - t0
    gc.collect()
    readings["after_load"] = proc_status()
    peak_reset = reset_peak()
    t1 = time.perf_counter()
    if kind == "generate":
        result = engine.generate(ids, max_new_tokens=spec["max_new_tokens"])
        new_tokens = len(result.token_ids)
        # the drafter's own quantized copy (quant, pld+quant)
        for k, v in (result.stats.method or {}).items():
            if k.endswith("quant_bytes") and isinstance(v, (int, float)):
                info["drafter_quant_bytes"] = int(v)
    else:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=spec["max_new_tokens"], do_sample=False)
        new_tokens = int(out.shape[1] - len(ids))
    gen_s = time.perf_counter() - t1
    gc.collect()
    after = proc_status()
    readings["after_generate"] = after
    result_path.write_text(json.dumps({
        "readings": readings, "peak_reset": peak_reset, "load_s": round(load_s, 3), "generate_s": round(gen_s, 3),
        "prompt_tokens": len(ids), "new_tokens": int(new_tokens),
        "tokens_per_s": round(new_tokens / gen_s, 2) if gen_s else None,
        "total_s": round(time.perf_counter() - t_start, 3), "info": info,
    }))  # fmt: skip


# ---- process handling: no orphans ------------------------------------------------------------

_CHILDREN: set[subprocess.Popen] = set()
_LOCK = threading.Lock()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(cmd: list[str], **kw) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent, **kw)
    with _LOCK:
        _CHILDREN.add(proc)
    return proc


def kill(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    with _LOCK:
        _CHILDREN.discard(proc)


def kill_all() -> None:
    with _LOCK:
        children = list(_CHILDREN)
    for proc in children:
        kill(proc, grace=3.0)


def _on_signal(signum, frame) -> None:
    kill_all()
    sys.exit(128 + signum)


class Watch:
    """Samples a process's /proc/PID/status every ``interval`` s on a thread: the largest RSS
    seen, the last reading, and a kill when RSS passes ``limit`` bytes."""

    def __init__(self, proc: subprocess.Popen, limit: int | None, interval: float = 0.2):
        self.proc, self.limit, self.interval = proc, limit, interval
        self.max_rss = 0
        self.last: dict[str, int] = {}
        self.over_limit = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            s = proc_status(self.proc.pid)
            if s:
                self.last = s
                self.max_rss = max(self.max_rss, s.get("VmRSS", 0), s.get("VmHWM", 0))
                if self.limit and s.get("VmRSS", 0) > self.limit:
                    self.over_limit = True
                    kill(self.proc, grace=1.0)
                    return
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _limit(args) -> int | None:
    return int(args.rss_limit_gib * GIB) if args.rss_limit_gib else None


# ---- the configurations --------------------------------------------------------------------


def run_child(label: str, spec: dict, args) -> dict:
    """One configuration in a fresh `python benchmarks/memory.py --child` process."""
    with tempfile.TemporaryDirectory(prefix="specdecode-memory-") as tmp:
        spec_path, result_path, log_path = Path(tmp, "spec.json"), Path(tmp, "result.json"), Path(tmp, "log.txt")
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path), "--child-result", str(result_path)]
        env = _child_env()
        _say(f"[{label}] running in a fresh process ...")
        with open(log_path, "w") as log:
            proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            watch = Watch(proc, _limit(args))
            try:
                proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                kill(proc)
                watch.stop()
                return {"label": label, "error": f"timed out after {args.timeout}s", "max_rss_sampled": watch.max_rss}
            finally:
                watch.stop()
                kill(proc)
        if watch.over_limit:
            return {"label": label, "error": f"killed: RSS passed --rss-limit-gib {args.rss_limit_gib}",
                    "max_rss_sampled": watch.max_rss}  # fmt: skip
        if proc.returncode != 0 or not result_path.exists():
            tail = log_path.read_text()[-1500:]
            return {"label": label, "error": f"exit code {proc.returncode}: {tail.strip()}"}
        out = json.loads(result_path.read_text())
    r = out["readings"]
    row = {
        "label": label, "kind": spec["kind"],
        "load_peak": r["after_load"].get("VmHWM"), "load_steady": r["after_load"].get("VmRSS"),
        "gen_peak": None, "gen_steady": r["after_generate"].get("VmRSS"),
        "gen_phase_peak": r["after_generate"].get("VmHWM") if out["peak_reset"] else None,
        "max_rss_sampled": watch.max_rss, **{k: out[k] for k in ("load_s", "generate_s", "prompt_tokens", "new_tokens",
                                                                   "tokens_per_s", "total_s", "info")},
        "readings": r,
    }  # fmt: skip
    # The lifetime peak: VmHWM was reset after loading, so it is the larger of the two phases.
    row["gen_peak"] = max(row["load_peak"] or 0, r["after_generate"].get("VmHWM") or 0)
    return row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_conversations(model_path: Path, n: int, tokens: int) -> tuple[list[list[dict]], list[int]]:
    """``n`` deterministic multi-turn chats of about ``tokens`` tokens each (through the model's
    chat template), each a different shuffle of PARAGRAPHS; their token counts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    if not getattr(tok, "chat_template", None):
        raise SystemExit(f"memory.py: {model_path} has no chat template: serve rows need chat requests (use --no-serve)")

    def count(messages: list[dict]) -> int:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    chats, sizes = [], []
    for i in range(n):
        rng = random.Random(1000 + i)
        messages = [{"role": "system", "content": f"You are assistant number {i}. Answer briefly."}]
        turn = 0
        while True:
            paras = rng.sample(PARAGRAPHS, 3)
            role = "user" if turn % 2 == 0 else "assistant"
            content = ("Please read this and tell me what matters:\n\n" if role == "user" else "Here it is again:\n\n") + "\n\n".join(paras)
            trial = messages + [{"role": role, "content": content}]
            if count(trial + ([{"role": "user", "content": "Summarize."}] if role == "assistant" else [])) > tokens:
                break
            messages = trial
            turn += 1
        if messages[-1]["role"] != "user":
            messages.append({"role": "user", "content": "Summarize our conversation in three sentences."})
        chats.append(messages)
        sizes.append(count(messages))
    return chats, sizes


async def _send_chats(url: str, model: str, chats: list[list[dict]], max_tokens: int, timeout: float) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(chats), max_keepalive_connections=len(chats))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(messages: list[dict]) -> dict:
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
            usage = r.json().get("usage", {})
            return {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}

        return list(await asyncio.gather(*(one(m) for m in chats)))


def run_serve(method: str, model: str, model_path: Path, args) -> dict:
    label = f"serve {method} (max-num-seqs {args.max_num_seqs}, {args.concurrency} x {args.conversation_tokens} tok)"
    import httpx

    chats, sizes = build_conversations(model_path, args.concurrency, args.conversation_tokens)
    port = _free_port()
    cmd = [sys.executable, "-m", "specdecode", "serve", "--model", model, "--method", method, "--dtype", "bfloat16",
           "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
           "--max-queue", str(max(64, args.concurrency)), "--threads", str(args.threads), "--log-level", "warning"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{method}-", suffix=".log", delete=False)
    _say(f"[{label}] starting the server (log {log.name}) ...")
    t0 = time.perf_counter()
    proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env())
    watch = Watch(proc, _limit(args))
    row: dict = {"label": label, "kind": "serve", "conversation_prompt_tokens": sizes}
    try:
        deadline = time.monotonic() + args.timeout
        health = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                reason = "RSS passed --rss-limit-gib" if watch.over_limit else f"exit code {proc.returncode}"
                return {**row, "error": f"the server exited ({reason}): {Path(log.name).read_text()[-1500:]}"}
            try:
                r = httpx.get(f"{url}/health", timeout=2)
                if r.status_code == 200:
                    health = r.json()
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        if health is None:
            return {**row, "error": f"the server did not answer /health in {args.timeout}s"}
        row["load_s"] = round(time.perf_counter() - t0, 3)
        loaded = proc_status(proc.pid)
        row.update(load_peak=loaded.get("VmHWM"), load_steady=loaded.get("VmRSS"))
        row["info"] = {"batching": {k: v for k, v in (health.get("batching") or {}).items()
                                    if k in ("enabled", "reason", "max_num_seqs", "max_batch_tokens", "kv_cache_bytes")}}  # fmt: skip
        peak_reset = reset_peak(proc.pid)
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        name = models["data"][0]["id"]
        _say(f"[{label}] {len(chats)} concurrent chats of {min(sizes)}-{max(sizes)} prompt tokens, {args.max_new_tokens} new tokens each ...")
        t1 = time.perf_counter()
        answers = asyncio.run(_send_chats(url, name, chats, args.max_new_tokens, args.timeout))
        row["generate_s"] = round(time.perf_counter() - t1, 3)
        errors = [a["error"] for a in answers if "error" in a]
        if errors:
            row["request_errors"] = errors
        new_tokens = sum(a.get("completion_tokens") or 0 for a in answers)
        row["new_tokens"], row["prompt_tokens"] = new_tokens, sum(a.get("prompt_tokens") or 0 for a in answers)
        row["tokens_per_s"] = round(new_tokens / row["generate_s"], 2) if row["generate_s"] else None
        after = proc_status(proc.pid)
        if watch.over_limit or not after:
            return {**row, "error": "killed: RSS passed --rss-limit-gib" if watch.over_limit else "the server died"}
        row.update(gen_steady=after.get("VmRSS"), gen_peak=max(row["load_peak"] or 0, after.get("VmHWM") or 0),
                   gen_phase_peak=after.get("VmHWM") if peak_reset else None)  # fmt: skip
        row["readings"] = {"after_load": loaded, "after_generate": after}
        row["max_rss_sampled"] = watch.max_rss
        return row
    finally:
        watch.stop()
        kill(proc, grace=15.0)
        log.close()


def find_llama_cpp(folder: Path | None, model_name: str, types: list[str]) -> tuple[Path | None, dict[str, Path], str]:
    """(the binary, {type: gguf}, why not) from llama_cpp.sh's work folder or a binaries folder."""
    if folder is None:
        return None, {}, "no --llama-cpp folder given (build it with benchmarks/llama_cpp.sh --prepare-only)"
    if not folder.is_dir():
        return None, {}, f"--llama-cpp {folder} is not a folder"
    bins = [folder, folder / "bin", *sorted(folder.glob("llama_cpp_python-*/vendor/llama.cpp/build/bin"))]
    binary = next((b / n for n in ("llama-completion", "llama-cli") for b in bins if (b / n).is_file() and os.access(b / n, os.X_OK)), None)  # fmt: skip
    if binary is None:
        return None, {}, f"no llama-completion or llama-cli binary under {folder} (looked in {', '.join(map(str, bins))})"
    ggufs = {}
    for t in types:
        f = next((d / f"{model_name}-{t}.gguf" for d in (folder, binary.parent) if (d / f"{model_name}-{t}.gguf").is_file()), None)
        if f is not None:
            ggufs[t] = f
    if not ggufs:
        return binary, {}, f"no {model_name}-{{{','.join(types)}}}.gguf in {folder} (llama_cpp.sh --model {model_name} --prepare-only writes them)"
    return binary, ggufs, ""


def run_llama_cpp(binary: Path, gguf: Path, gtype: str, model_path: Path, args) -> dict:
    label = f"llama.cpp {gtype} (-c {args.llama_ctx})"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False) if getattr(tok, "chat_template", None) else PROMPT  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="specdecode-memory-llama-") as tmp:
        prompt_file, log_path = Path(tmp, "prompt.txt"), Path(tmp, "log.txt")
        prompt_file.write_text(text)
        cmd = [str(binary), "-m", str(gguf), "-f", str(prompt_file), "-n", str(args.max_new_tokens), "-t", str(args.threads),
               "-c", str(args.llama_ctx), "--temp", "0", "--seed", "0", "--no-display-prompt"]  # fmt: skip
        cmd.append("-no-cnv")  # plain completion, no interactive chat
        _say(f"[{label}] {' '.join(cmd)}")
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            watch = Watch(proc, _limit(args), interval=0.05)
            try:
                _, status, rusage = os.wait4(proc.pid, 0)  # its own rusage: the lifetime peak (ru_maxrss, KiB)
                proc.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                rusage = None
            finally:
                watch.stop()
                kill(proc)
        wall = time.perf_counter() - t0
        out = log_path.read_text(errors="replace")
    if watch.over_limit:
        return {"label": label, "kind": "llama.cpp", "error": "killed: RSS passed --rss-limit-gib"}
    if proc.returncode != 0:
        return {"label": label, "kind": "llama.cpp", "error": f"exit code {proc.returncode}: {out[-1500:]}"}
    times = {}
    for line in out.splitlines():
        for key in ("load time", "prompt eval time", "eval time", "total time"):
            if f" {key} =" in line and key not in times:
                try:
                    times[key] = float(line.split("=", 1)[1].split("ms")[0])
                except ValueError:
                    pass
    peak = rusage.ru_maxrss * 1024 if rusage is not None else watch.max_rss
    return {"label": label, "kind": "llama.cpp", "load_peak": None, "load_steady": None, "gen_peak": peak,
            "gen_steady": watch.last.get("VmRSS"), "gen_phase_peak": None, "max_rss_sampled": watch.max_rss,
            "load_s": round(times["load time"] / 1000, 3) if "load time" in times else None,
            "generate_s": round(times["eval time"] / 1000, 3) if "eval time" in times else round(wall, 3),
            "readings": {"last_sampled": watch.last}, "info": {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
            "llama_perf_ms": times}}  # fmt: skip


# ---- report ----------------------------------------------------------------------------------


def _gib(v) -> str:
    return "—" if v is None else f"{v / GIB:.2f}"


def markdown(report: dict) -> str:
    rows = report["rows"]
    ref = next((r for r in rows if r.get("kind") == "transformers" and not r.get("error")), None)
    ref_steady = ref.get("gen_steady") if ref else None
    weights = report["weights_bf16_bytes"]
    lines = [
        f"Memory of `{report['model']}` (bf16 weights {weights / GIB:.2f} GiB = {weights:,} bytes in "
        f"{report['tensors']} tensors), {report['threads']} threads, {report['max_new_tokens']} new tokens, "
        f"{report['cpu']}, commit {report['commit'][:12] + report['commit'][40:]}; GiB = 2^30 bytes, RSS from /proc/PID/status.",
        "",
        "| configuration | load peak | steady after load | peak after generate | steady after generate | generate peak | "
        "steady / weights | x transformers steady | load s | generate s (tok/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("error"):
            seen = f" (RSS reached {r['max_rss_sampled'] / GIB:.2f} GiB)" if r.get("max_rss_sampled") else ""
            lines.append(f"| {r['label']} | {r['error'].splitlines()[0][:120]}{seen} |||||||||")
            continue
        steady = r.get("gen_steady")
        ratio = f"{steady / ref_steady:.2f}" if steady and ref_steady else "—"
        per_w = f"{steady / weights:.2f}" if steady and weights else "—"
        tps = f" ({r['tokens_per_s']})" if r.get("tokens_per_s") else ""
        gen = f"{r['generate_s']}{tps}" if r.get("generate_s") is not None else "—"
        lines.append(
            f"| {r['label']} | {_gib(r.get('load_peak'))} | {_gib(r.get('load_steady'))} | {_gib(r.get('gen_peak'))} | "
            f"{_gib(steady)} | {_gib(r.get('gen_phase_peak'))} | {per_w} | {ratio} | {r.get('load_s', '—')} | {gen} |"
        )
    if report.get("skipped"):
        lines += ["", *[f"Skipped: {s}" for s in report["skipped"]]]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    """The commit measured: HEAD, with "+dirty" when src/ has uncommitted changes; for a tree
    exported with ``git archive`` (no .git), the hash in its COMMIT file."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.strip()  # fmt: skip
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        f = REPO / "COMMIT"
        return f.read_text().strip() + " (exported)" if f.is_file() else "unknown"


def _child_env() -> dict[str, str]:
    """Children import specdecode from this tree's src/ (not whatever is installed)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO / "src") + (os.pathsep + path if path else ""),
            "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help="model folder or known short name (default smollm2-135m)")
    p.add_argument("--out", type=Path, default=Path("bench_out/memory"), help="folder for the JSON and markdown (default bench_out/memory)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated methods of the generate rows, '' for none (default {DEFAULT_METHODS})")
    p.add_argument("--quantize", default=None, help="also run every --methods row with the model itself quantized (e.g. int4, int4-g128, int8)")
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per generation / request (default 64)")
    p.add_argument("--no-serve", action="store_true", help="skip the serve rows")
    p.add_argument("--serve-methods", default="vanilla", help="comma-separated methods, one server each (default vanilla)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="the servers' --max-num-seqs (default 8)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent chat requests sent to each server (default 8)")
    p.add_argument("--conversation-tokens", type=int, default=2048, help="prompt tokens of each conversation, about (default 2048)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers row")
    p.add_argument("--llama-cpp", type=Path, help="llama_cpp.sh's work folder (or a folder with llama-completion/llama-cli and the GGUFs)")
    p.add_argument("--llama-cpp-types", default="BF16,Q4_K_M", help="GGUF types to run (default BF16,Q4_K_M)")
    p.add_argument("--llama-ctx", type=int, default=4096, help="llama.cpp context (-c), which sizes its KV cache (default 4096)")
    p.add_argument("--warmup", action="store_true",
                   help="first load the model once per --quantize setting, unmeasured: the load-time kernel check and "
                        "cost curves are measured once per machine and cached, and a first load's transients are not "
                        "what later loads hold")  # fmt: skip
    p.add_argument("--timeout", type=float, default=1800, help="seconds one configuration may take (default 1800)")
    p.add_argument("--rss-limit-gib", type=float, default=0, help="kill a configuration whose RSS passes this (default 0: no limit)")
    p.add_argument("--render", type=Path, help="only print the markdown table of a JSON report written before")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child or args.render:
        return args
    for name in ("threads", "max_new_tokens", "max_num_seqs", "concurrency", "conversation_tokens", "llama_ctx"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.timeout <= 0:
        p.error(f"--timeout must be positive, got {args.timeout}")
    if args.rss_limit_gib < 0:
        p.error(f"--rss-limit-gib must be >= 0, got {args.rss_limit_gib}")
    sys.path.insert(0, str(REPO / "src"))
    from specdecode.backends.quant import QuantConfig
    from specdecode.drafters import registry
    from specdecode.errors import SpecDecodeError
    from specdecode.hub import resolve_model

    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.serve_methods = [] if args.no_serve else [m.strip() for m in args.serve_methods.split(",") if m.strip()]
    for flag, methods in (("--methods", args.methods), ("--serve-methods", args.serve_methods)):
        for m in methods:
            try:
                registry.components(m)
                registry.check_draft_model(m, None)
            except SpecDecodeError as e:
                p.error(f"{flag}: {e}")
    if args.quantize is not None:
        try:
            QuantConfig.parse(args.quantize, "quantize")
        except SpecDecodeError as e:
            p.error(f"--quantize: {e}")
    args.llama_cpp_types = [t.strip() for t in args.llama_cpp_types.split(",") if t.strip()]
    try:
        args.model_path = resolve_model(args.model, pull_missing=False, progress=False)
    except SpecDecodeError as e:
        p.error(f"--model: {e}")
    if not any(args.model_path.glob("*.safetensors")):
        p.error(f"--model: {args.model_path} has no *.safetensors files")
    if args.serve_methods:
        cfg = json.loads((args.model_path / "config.json").read_text())
        ctx = cfg.get("max_position_embeddings") or 0
        if ctx and args.conversation_tokens + args.max_new_tokens >= ctx:
            p.error(f"--conversation-tokens {args.conversation_tokens} + --max-new-tokens {args.max_new_tokens} "
                    f"exceed the model's context ({ctx})")  # fmt: skip
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child.read_text()), args.child_result)
        return
    if args.render:
        print(markdown(json.loads(args.render.read_text())), end="")
        return
    atexit.register(kill_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    weights, tensors = safetensors_bytes(args.model_path)
    model = str(args.model_path)
    rows, skipped = [], []
    base = {"threads": args.threads, "max_new_tokens": args.max_new_tokens}
    quants = [None] + ([args.quantize] if args.quantize else [])
    if args.warmup and args.methods:
        for q in quants:
            w = run_child(f"warm-up{' --quantize ' + q if q else ''}", {**base, "kind": "generate", "model": model,
                          "method": args.methods[0], "quantize": q, "max_new_tokens": 4}, args)  # fmt: skip
            if w.get("error"):
                _say(f"  warm-up failed: {w['error'][:300]}")
    for q in quants:
        for m in args.methods:
            label = f"generate {m}" + (f" --quantize {q}" if q else "")
            rows.append(run_child(label, {**base, "kind": "generate", "model": model, "method": m, "quantize": q}, args))
            _say(f"  -> {json.dumps({k: rows[-1].get(k) for k in ('load_peak', 'load_steady', 'gen_peak', 'gen_steady', 'error')})}")
    for m in args.serve_methods:
        rows.append(run_serve(m, model, args.model_path, args))
        _say(f"  -> {json.dumps({k: rows[-1].get(k) for k in ('load_peak', 'load_steady', 'gen_peak', 'gen_steady', 'error')})}")
    if not args.no_transformers:
        rows.append(run_child("transformers (AutoModelForCausalLM bf16 + generate)", {**base, "kind": "transformers", "path": model}, args))
    binary, ggufs, why = find_llama_cpp(args.llama_cpp, args.model_path.name, args.llama_cpp_types)
    if why:
        skipped.append(f"llama.cpp: {why}")
        _say(f"skipping llama.cpp: {why}")
    for t, f in ggufs.items():
        rows.append(run_llama_cpp(binary, f, t, args.model_path, args))
    for t in args.llama_cpp_types:
        if binary is not None and ggufs and t not in ggufs:
            skipped.append(f"llama.cpp {t}: no {args.model_path.name}-{t}.gguf")
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    report = {
        "model": args.model, "model_path": model, "weights_bf16_bytes": weights, "tensors": tensors,
        "threads": args.threads, "max_new_tokens": args.max_new_tokens, "prompt": PROMPT,
        "conversation_tokens": args.conversation_tokens, "concurrency": args.concurrency, "max_num_seqs": args.max_num_seqs,
        "commit": _commit(), "cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "transformers", "safetensors")},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "skipped": skipped,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"memory-{args.model_path.name}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md_text = markdown(report)
    (args.out / f"{stem}.md").write_text(md_text)
    print(md_text)
    _say(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.md')}")


if __name__ == "__main__":
    main()
