"""Bugs found by reading (issue 9), each shown where a CPU can show it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from specdecode import Engine
from specdecode.sampling import make_generator
from specdecode.text import IncrementalDetokenizer


@pytest.fixture(scope="module")
def stories_pld(stories_path):
    return Engine.from_pretrained(stories_path, "pld", sizing="fixed", progress=False)  # steps that repeat


def test_sampling_generator_lives_on_the_models_device(stories_pld, monkeypatch):
    """The generator must be on the device the logits are sampled on (a CPU generator with CUDA
    logits fails): the engine asks for one on its target's device."""
    import specdecode.decoding as decoding_module

    devices = []

    def recording(device, seed):
        devices.append(device)
        return make_generator(device, seed)

    monkeypatch.setattr(decoding_module, "make_generator", recording)
    stories_pld.generate("Once upon a time", max_new_tokens=4, temperature=1.0, seed=3)
    assert devices == [stories_pld.target.device]
    assert make_generator(torch.device("cpu"), 5).device == torch.device("cpu")


def test_unseeded_sampling_leaves_the_global_random_state_alone(stories_pld):
    before = torch.random.get_rng_state()
    a = stories_pld.generate("Once upon a time", max_new_tokens=8, temperature=1.0)
    after = torch.random.get_rng_state()
    assert torch.equal(before, after)
    assert a.stats.new_tokens > 0
    # Unseeded calls still vary (seeded from the OS), seeded ones repeat.
    seeded = [stories_pld.generate("Once upon a time", max_new_tokens=16, temperature=1.0, seed=7).token_ids for _ in range(2)]
    assert seeded[0] == seeded[1]
    runs = {tuple(stories_pld.generate("Once upon a time", max_new_tokens=16, temperature=1.0).token_ids) for _ in range(4)}
    assert len(runs) > 1


def test_stats_after_a_stop_string_count_only_the_output(stories_pld):
    full = stories_pld.generate("Once upon a time", max_new_tokens=64)
    tok = stories_pld.tokenizer
    # A stop string that ends in the middle of a step that emitted several tokens at once.
    ends = [sum(full.stats.accept_lengths[: i + 1]) for i in range(len(full.stats.accept_lengths))]
    stop = None
    for i, n in enumerate(full.stats.accept_lengths):
        if i and n >= 3:
            prefix = tok.decode(full.token_ids[: ends[i - 1] + 1], skip_special_tokens=True)  # 1 token in
            # The shortest tail of that prefix that first occurs right there.
            stop = next((prefix[-n:] for n in range(2, len(prefix)) if full.text.find(prefix[-n:]) == len(prefix) - n), None)
            if stop:
                break
    assert stop is not None, "no multi-token step to cut"
    cut = stories_pld.generate("Once upon a time", max_new_tokens=64, stop=stop)
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.stats.new_tokens == len(cut.token_ids) == sum(cut.stats.accept_lengths)
    assert len(cut.token_ids) < len(full.token_ids)


class _CountingTokenizer:
    """A tokenizer whose tokens are words; counts the tokens it is asked to decode."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_detokenizing_is_incremental_and_equals_a_full_decode(stories_pld):
    result = stories_pld.generate("Once upon a time", max_new_tokens=200)
    ids = result.token_ids
    tok = _CountingTokenizer(stories_pld.tokenizer)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add([t]) for t in ids] + [detok.flush()]
    assert "".join(pieces) == detok.text == stories_pld.tokenizer.decode(ids, skip_special_tokens=True)
    # Linear, not quadratic: decoding everything at every step would be ~n^2/2 = 20000 tokens.
    assert tok.decoded < 10 * len(ids), tok.decoded
    # The engine's streamed pieces add up to the result's text.
    stream = stories_pld.stream("Once upon a time", max_new_tokens=200)
    assert "".join(stream) == stream.result.text == result.text


def test_incremental_detokenizer_holds_back_half_a_character():
    class Bytes:  # each token one byte of UTF-8
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    detok = IncrementalDetokenizer(Bytes())
    data = "héllo €".encode()
    out = [detok.add([b]) for b in data]
    assert "\ufffd" not in "".join(out)
    assert "".join(out) + detok.flush() == "héllo €"


def test_a_worker_stopped_mid_request_tells_the_client_and_is_no_disconnect():
    from specdecode.server.worker import GenerationRequest, Job, Worker, WorkerStopped

    started = threading.Event()

    class SlowStream:
        result = None

        def __iter__(self):
            for _ in range(1000):
                started.set()
                time.sleep(0.01)
                yield "x"

        def close(self):
            pass

    class SlowEngine:
        class target:
            max_length = 1000

        def encode(self, prompt):
            return [1, 2, 3]

        def stream(self, *args, **kwargs):
            return SlowStream()

    loop = asyncio.new_event_loop()
    try:
        worker = Worker(SlowEngine(), max_queue=2)
        worker.start()
        job = Job(GenerationRequest(prompt="hi", max_tokens=5, default_max_tokens=None, stream=True), loop)
        worker.submit(job)
        assert started.wait(5)
        worker.stop()
        loop.run_until_complete(asyncio.sleep(0.05))  # deliver the events
        events = []
        while not job.events.empty():
            events.append(job.events.get_nowait())
        kinds = [k for k, _ in events]
        assert kinds[-1] == "error" and isinstance(events[-1][1], WorkerStopped), kinds
        assert worker.cancelled_total == 0
    finally:
        loop.close()


_PEAK_PROBE = """
import torch
from specdecode.bench.worker import Memory

memory = Memory(torch.device("cpu"))
if not memory.per_turn:
    print("skip")
else:
    memory.start()
    big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched, then freed
    del big
    with_spike = memory.peak()
    memory.start()
    without = memory.peak()
    print(with_spike, without)
"""


def test_bench_memory_is_the_peak_of_the_turn():
    """Run in a fresh process: a long-lived test process has freed heap that glibc hands back for
    the spike without touching new pages, so its resident set (rightly) never grows."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True, timeout=300, check=True
    ).stdout.split()
    if out == ["skip"]:
        pytest.skip("this system cannot reset the peak resident set size")
    with_spike, without = map(int, out)
    assert with_spike - without > 48 << 20
