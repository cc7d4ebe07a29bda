"""The transfer engine and the cache under concurrency: no lost or duplicated experts, no deadlock."""

import os
import random
import threading
import time

import numpy as np
import pytest
import torch

from offload_moe.runtime.cache import ExpertCache
from offload_moe.runtime.counters import Counters
from offload_moe.runtime.disk import FileSpan
from offload_moe.runtime.eviction import LRU
from offload_moe.runtime.ram_tier import RamTier
from offload_moe.runtime.speculation import Payoff, Source
from offload_moe.runtime.store import HostStore, Piece
from offload_moe.runtime.transfer import PREFETCH, TransferEngine, chunk_parts
from tests.emulation import EmulatedLink
from tests.helpers import DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_many_outstanding_copies_all_land(device):
    engine = TransferEngine(torch.device(device))
    pin = device == "cuda"  # host copies are pinned for asynchronous copies on CUDA
    src = [torch.randn(64, 64).pin_memory() if pin else torch.randn(64, 64) for _ in range(200)]
    dst = [torch.zeros(64, 64, device=device) for _ in range(200)]
    transfers = [engine.submit([s], [d]) for s, d in zip(src, dst, strict=True)]
    for t in reversed(transfers):  # waiting out of order is fine
        t.wait()
    assert all(t.done() for t in transfers)
    assert all(torch.equal(s, d.cpu()) for s, d in zip(src, dst, strict=True))
    engine.shutdown()


def test_emulated_link_takes_at_least_bytes_over_bandwidth():
    link = EmulatedLink(gbps=0.01, latency_us=1000)  # 10 MB/s
    engine = TransferEngine(torch.device("cpu"), link)
    t0 = time.perf_counter()
    transfers = [engine.submit([torch.ones(25_000)], [torch.zeros(25_000)]) for _ in range(2)]  # 100 kB each
    for t in transfers:
        t.wait()
    elapsed = time.perf_counter() - t0
    assert elapsed >= 2 * link.seconds(100_000)  # one link: copies are serialised
    engine.shutdown()


def test_the_engine_measures_how_much_of_a_copy_keeps_a_cpu_busy():
    """A memcpy keeps its thread on a CPU; an emulated link's copy mostly sleeps. The cache decides by this whether a
    copy competes with the kernels on a CPU device."""
    shares = []
    for pace in (None, EmulatedLink(gbps=0.01, latency_us=1000)):
        engine = TransferEngine(torch.device("cpu"), pace)
        assert engine.cpu_share() == 0.0  # nothing measured yet
        for _ in range(4):
            engine.submit([torch.ones(1 << 20)], [torch.zeros(1 << 20)]).wait()  # 4 MB: ~1 ms of memcpy
        shares.append(engine.cpu_share())
        engine.shutdown()
    memcpy, paced = shares
    assert memcpy >= 0.5 > paced


def test_a_failed_copy_raises_on_wait():
    engine = TransferEngine(torch.device("cpu"))
    bad = engine.submit([torch.ones(3)], [torch.zeros(4)])
    with pytest.raises(RuntimeError, match="expert transfer failed"):
        bad.wait()
    good = engine.submit([torch.ones(4)], [torch.zeros(4)])  # the worker survives
    good.wait()
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit([torch.ones(1)], [torch.zeros(1)])


@pytest.fixture
def file_span(tmp_path):
    """Writes a tensor's bytes to a file and returns a span of it; the files are closed at teardown."""
    fds = []

    def make(t: torch.Tensor, name: str) -> FileSpan:
        (tmp_path / name).write_bytes(t.contiguous().view(torch.uint8).numpy().tobytes())
        fds.append(os.open(tmp_path / name, os.O_RDONLY))
        return FileSpan(fds[-1], 0, t.dtype, tuple(t.shape))

    yield make
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("source", ["tensor", "file"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_demand_copy_preempts_a_speculative_one_at_a_chunk_boundary(device, source, file_span):
    """A 1 MB speculative copy in 16 chunks over a 20 MB/s emulated link (50 ms); a demand copy submitted 5 ms in
    lands long before it, the speculative copy is resumed where it stopped and lands whole. The same with both
    copies read from files (pread, each chunk's page cache released)."""
    link = EmulatedLink(gbps=0.02)
    engine = TransferEngine(torch.device(device), link, chunk_bytes=64 * 1024)
    pin = device == "cuda" and source == "tensor"
    big = torch.randn(256, 1024)
    big = big.pin_memory() if pin else big
    big_dst = torch.zeros(256, 1024, device=device)
    big_src = file_span(big, "big") if source == "file" else big
    speculative = engine.submit([big_src], [big_dst], priority=PREFETCH)
    time.sleep(0.005)
    small, small_dst = torch.randn(16, 64), torch.zeros(16, 64, device=device)
    small_src = file_span(small, "small") if source == "file" else small
    demand = engine.submit([small_src.pin_memory() if pin else small_src], [small_dst])
    demand.wait()
    assert not speculative.done()  # the demand copy did not wait for the whole speculative one
    speculative.wait()
    assert torch.equal(small_dst.cpu(), small) and torch.equal(big_dst.cpu(), big.cpu())
    use = engine.link_use()
    assert use["preemptions"] >= 1 and 0 < use["speculative_link_seconds"]  # the rest ran promoted, as demand
    assert use["link_seconds"] >= 0.9 * (link.seconds(big.numel() * 4) + link.seconds(small.numel() * 4))
    engine.shutdown()


@pytest.mark.parametrize("device", DEVICES)
def test_file_spans_convert_dtype_and_refuse_a_short_file(device, file_span, tmp_path):
    """A bf16 span into a float32 destination goes through the staging buffer; a span past the end of its file fails
    the copy with a message that says the shard is truncated, and nothing is served from it."""
    engine = TransferEngine(torch.device(device), chunk_bytes=1024)
    w = torch.randn(64, 32).to(torch.bfloat16)
    dst = torch.zeros(64, 32, device=device)
    engine.submit([file_span(w, "w")], [dst]).wait()
    assert torch.equal(dst.cpu(), w.float())
    span = file_span(w, "short")
    os.truncate(tmp_path / "short", 1000)
    with pytest.raises(RuntimeError, match="expert transfer failed: .*the checkpoint shard is truncated"):
        engine.submit([span], [torch.zeros(64, 32, dtype=torch.bfloat16, device=device)]).wait()
    engine.shutdown()


def test_chunks_are_whole_rows_in_order_small_tensors_together_and_each_part_ends_where_it_is_complete():
    big, a, b, c = torch.arange(40.0).view(10, 4), torch.ones(3), torch.full((3,), 2.0), torch.full((2,), 3.0)
    dst = [torch.zeros(10, 4), torch.zeros(3)], [torch.zeros(3)], [torch.zeros(2)]
    parts = [([big, a], dst[0]), ([b], dst[1]), ([c], dst[2])]
    chunks, ends, nbytes = chunk_parts(parts, chunk_bytes=3 * 16)  # three rows of 16 bytes a chunk
    assert [c[1][0].shape[0] for c in chunks[:4]] == [3, 3, 3, 1] and len(chunks) == 5
    assert [len(c[1]) for c in chunks] == [1, 1, 1, 1, 3]  # a, b and c fit one chunk
    assert ends == [5, 5, 5] and [c[2] for c in chunks] == [1, 0, 0, 0, 2] and nbytes == 160 + 12 + 12 + 8
    assert [c.nbytes for c in chunks] == [48, 48, 48, 16, 32]
    one, ends, _ = chunk_parts(parts, chunk_bytes=nbytes)  # everything fits: one chunk, every part complete in it
    assert len(one) == 1 and ends == [1, 1, 1] and one[0].begun == 3 and one[0].nbytes == nbytes
    assert [t.data_ptr() for t in one[0].dst] == [t.data_ptr() for part in dst for t in part]
    chunks, ends, _ = chunk_parts(parts, chunk_bytes=16)  # a row a chunk: each small tensor alone
    assert len(chunks) == 13 and ends == [11, 12, 13] and sum(c[2] for c in chunks) == 3
    assert [c.nbytes for c in chunks] == [16] * 10 + [12, 12, 8]
    for chunk in chunks:
        for x, y in zip(chunk.src, chunk.dst, strict=True):
            y.copy_(x)
    assert torch.equal(dst[0][0], big) and torch.equal(dst[0][1], a)
    assert torch.equal(dst[1][0], b) and torch.equal(dst[2][0], c)
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1"):
        TransferEngine(torch.device("cpu"), chunk_bytes=0)


def test_each_part_of_a_copy_can_be_waited_for_and_a_failure_fails_only_the_parts_it_reached():
    """Parts land in order and each can be waited for alone (the waiting thread moves the chunks up to it, the worker
    the rest); a part that fails fails itself and those after it, never those before."""
    engine = TransferEngine(torch.device("cpu"), EmulatedLink(gbps=0.01), chunk_bytes=1024)  # 100 us a chunk
    src = [torch.randn(256) for _ in range(4)]  # a chunk each
    dst = [torch.zeros(256) for _ in range(4)]
    transfer = engine.submit_parts([([s], [d]) for s, d in zip(src, dst, strict=True)], [], wake=False)
    assert not transfer.done(0)
    transfer.wait(1)
    assert transfer.done(0) and transfer.done(1) and torch.equal(dst[1], src[1])
    transfer.wait()
    assert all(torch.equal(s, d) for s, d in zip(src, dst, strict=True))
    broken = engine.submit_parts([([src[0]], [dst[0]]), ([torch.ones(3)], [dst[1]]), ([src[2]], [dst[2]])], [])
    with pytest.raises(RuntimeError, match="expert transfer failed"):
        broken.wait(2)
    assert broken.wait(0) == 0.0 and not broken.failed(0) and broken.failed(1) and broken.failed(2)
    engine.shutdown()


def test_a_source_stops_when_its_copies_do_not_land_in_time_and_comes_back_when_they_would():
    payoff = Payoff()
    assert payoff.allows()  # a new source may try
    payoff.outcome(False)  # its first copy did not pay: 0.45 < 0.5
    assert not payoff.allows()
    assert [payoff.wants() for _ in range(16)].count(True) == 2  # its suggestions are computed 1 call in 8, to judge
    payoff.outcome(True)  # a judged suggestion would have paid: 0.505
    assert payoff.allows() and all(payoff.wants() for _ in range(8))


def test_suggestions_of_a_source_that_does_not_pay_are_judged_without_copying():
    """On a slow link (a 640-byte expert takes 1.3 ms), lookahead suggestions one layer ahead are right but land too
    late: after its first copy the source stops, and its later suggestions copy nothing, judged against the time a
    copy would have taken."""
    store, _ = _store(pinned=False)
    engine = TransferEngine(torch.device("cpu"), EmulatedLink(gbps=0.0005))
    counters = Counters(num_layers=4)
    cache = ExpertCache(store, 5, torch.device("cpu"), torch.float32, engine, LRU(), counters, top_k=1)
    for token in range(3):
        for layer in range(4):
            _acquire(cache, layer, [token])
            if layer < 3:  # right, but one layer ahead
                cache.speculate([(layer + 1, token)], {(layer, token)}, Source.LOOKAHEAD)
    engine.shutdown()
    assert counters.prefetches == 3 and counters.speculation_skipped == 6  # each layer's first copy, then nothing
    assert counters.prefetches_used == 0
    assert not any(cache.speculation.payoff(Source.LOOKAHEAD, layer).allows() for layer in (1, 2, 3))


@pytest.mark.parametrize("first", ["victim", "copy"])
def test_a_prefetch_whose_victim_is_needed_first_did_not_pay(first):
    """A prefetch that evicts an expert needed before the prefetched one cost a miss: it did not pay, even if its own
    expert is needed later; one needed first paid."""
    store, _ = _store(pinned=False)
    engine = TransferEngine(torch.device("cpu"))
    cache = ExpertCache(store, 2, torch.device("cpu"), torch.float32, engine, LRU(), Counters(num_layers=4), top_k=1)
    for e in (0, 1):
        _acquire(cache, 0, [e])
    assert cache.speculate([(1, 5)], set(), Source.LOOKAHEAD) and (0, 0) not in cache.resident()  # the oldest
    while not engine.idle():  # landed: in time for whichever use comes first
        time.sleep(0.001)
    order = [(0, 0), (1, 5)] if first == "victim" else [(1, 5), (0, 0)]
    for layer, e in order:
        cache.prepare(layer, [e])
    engine.shutdown()
    assert cache.speculation.payoff(Source.LOOKAHEAD, 1).allows() == (first == "copy")


class _CopiesWait(TransferEngine):
    """Copies that leave the CPU free while they run (a DMA engine, a disk): measured so, whatever this machine does."""

    def cpu_share(self) -> float:
        return 0.0


class _CopiesTakeACore(_CopiesWait):
    """Copies that keep a CPU busy (a memcpy): on a CPU device they take the cores the kernels run on."""

    def cpu_share(self) -> float:
        return 1.0


@pytest.mark.parametrize("engine_class", [_CopiesWait, _CopiesTakeACore])
def test_copies_of_host_computed_experts_are_judged_by_admission_and_never_take_the_cores(engine_class):
    """A "host" copy is made when its expert was needed more often than its victim, whatever its pay-off; a stand-in
    source whose copies did not pay copies nothing. On a CPU device whose copies keep a CPU busy no "host" copy is
    made: the host job already ran on those cores from the same memory."""
    store, _ = _store(pinned=False)
    engine = engine_class(torch.device("cpu"))
    cache = ExpertCache(store, 2, torch.device("cpu"), torch.float32, engine, LRU(), Counters(num_layers=4), top_k=1)
    for e in (0, 1):  # resident, each needed once
        _acquire(cache, 0, [e])
    for source in (Source.HOST, Source.STANDIN):
        for _ in range(8):
            cache.speculation.payoff(source, 0).outcome(False)
    for _ in range(2):
        cache.prepare(0, [2])  # missed twice: computed on the host
    cache.prepare(0, [3])  # missed once
    assert cache.speculate([(0, 4)], set(), Source.STANDIN) and (0, 4) not in cache.resident()  # judged only
    if engine_class is _CopiesTakeACore:
        assert cache.speculate([(0, 2)], set(), Source.HOST) and (0, 2) not in cache.resident()  # admitted, not copied
    else:
        assert cache.speculate([(0, 3)], set(), Source.HOST) is False  # needed once, like its victim: not admitted
        assert cache.speculate([(0, 2)], set(), Source.HOST) and (0, 2) in cache.resident()
    engine.shutdown()


def test_emulated_link_rejects_nonsense():
    with pytest.raises(ValueError, match="gbps > 0"):
        EmulatedLink(gbps=0)
    with pytest.raises(ValueError, match="latency_us >= 0"):
        EmulatedLink(gbps=1, latency_us=-1)


def _batches(cache: ExpertCache, layer: int, need: list[int]):
    """What the hook does for a layer call that needs `need` (ascending): count it, copy the missing experts in and
    stream them (a set too small for them all at once evicts computed ones); per batch, its kernel slot ids, checked
    by `check` before the next batch, then the end of the batch's kernel."""
    missing, inflight, _ = cache.prepare(layer, need)
    protected = {(layer, e) for e in need}
    started = cache.fetch(layer, missing, protected)
    waiting = [e for e in need if e in inflight or e in started]
    ids = np.array([need])
    for batch in cache.stream(layer, need, waiting, missing[len(started) :], protected, pass_seconds=0.0):
        yield batch, cache.kernel_index(layer, ids, torch.from_numpy(ids).to(cache.device), batch)
        cache.release(layer, batch)


def _acquire(cache: ExpertCache, layer: int, need: list[int]) -> None:
    for _ in _batches(cache, layer, need):
        pass


def _store(layers=4, experts=8, pinned=False):
    gen = torch.Generator().manual_seed(0)
    weights = [
        {"w": torch.randn(experts, 16, 8, generator=gen), "v": torch.randn(experts, 8, 4, generator=gen)}
        for _ in range(layers)
    ]
    if pinned:
        weights = [{n: t.pin_memory() for n, t in w.items()} for w in weights]
    return HostStore.from_fused(weights), weights


@pytest.mark.parametrize("device", DEVICES)
def test_cache_stress_prefetch_racing_eviction(device):
    """Random demand (acquire) interleaved with speculative loads (prefetch-style) over a slow emulated link; on
    CUDA, copy-stream events order every slot overwrite after the kernels that read it (checked by the contents)."""
    store, weights = _store(pinned=device == "cuda")
    engine = TransferEngine(torch.device(device), EmulatedLink(gbps=0.05))
    counters = Counters(num_layers=4)
    cache = ExpertCache(store, 5, torch.device(device), torch.float32, engine, LRU(), counters, top_k=3)
    rng = random.Random(0)
    errors = []

    def drive():
        try:
            for _ in range(400):
                layer = rng.randrange(4)
                need = rng.sample(range(8), rng.randint(1, 3))
                for _ in range(rng.randint(0, 3)):  # speculative copies, possibly of other layers
                    # the copy mechanism itself, under the speculation policy (which would stop random guesses)
                    key = (rng.randrange(4), rng.randrange(8))
                    if key not in cache.resident():
                        cache._load(key, set(), Source.LOOKAHEAD)
                computed = []
                for batch, kidx in _batches(cache, layer, sorted(need)):
                    for e, local in zip(sorted(need), kidx.index[0].tolist(), strict=True):
                        if e in batch:  # exactly that expert, landed
                            slot = kidx.lo + local
                            assert torch.equal(cache.pool["w"][slot].cpu(), weights[layer]["w"][e])
                            assert torch.equal(cache.pool["v"][slot].cpu(), weights[layer]["v"][e])
                    assert int((kidx.index < kidx.hi - kidx.lo).sum()) == len(batch)
                    computed += batch
                assert sorted(computed) == sorted(need)
                # invariants: one slot per key
                slots = cache.resident()
                assert len(set(slots.values())) == len(slots) <= 5
        except BaseException as e:  # reported below
            errors.append(e)

    worker = threading.Thread(target=drive)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "deadlock: the driver did not finish in 120 s"
    assert not errors, errors
    engine.shutdown()
    s = counters.snapshot()
    assert s.copies > s.misses > 0 and s.hits > 0 and s.inflight_hits > 0
    assert s.bytes_copied == s.copies * cache.slot_bytes


@pytest.mark.parametrize("pace", [None, EmulatedLink(gbps=0.05, latency_us=2000)])
def test_on_a_cpu_device_a_call_moves_copies_that_keep_a_cpu_busy_before_its_one_pass(pace):
    """A memcpy beside a kernel pass on a CPU device takes a core the pass waits for: the call's copies land first
    and one batch computes everything. A copy that mostly waits (an emulated link) overlaps the ready experts' pass,
    which the hook estimates shorter than the copy (pass_seconds=0 here). The engine learns how much of a copy keeps
    its thread on a CPU from the copies before: nine, so that a thread descheduled mid-copy on a loaded machine (its
    share near 0) leaves the average where the others put it."""
    store, _ = _store()
    engine = TransferEngine(torch.device("cpu"), pace)
    cache = ExpertCache(store, 6, torch.device("cpu"), torch.float32, engine, LRU(), Counters(num_layers=4), top_k=3)
    for layer in (1, 2):
        for e in range(4, 8):
            _acquire(cache, layer, [e])
    _acquire(cache, 0, [0, 1, 2])
    batches = [list(b) for b, _ in _batches(cache, 0, [0, 3, 4])]  # 0 resident, 3 and 4 copied
    engine.shutdown()
    assert batches == ([[0, 3, 4]] if pace is None else [[0], [3, 4]])


def test_a_ram_tier_reads_again_what_a_failed_copy_never_brought(file_span):
    """A one-slot RAM tier: a copy that fails (its span runs past the end of the file) leaves the expert a miss, the
    next copy reads the file again, and the one after is served from RAM."""
    w = torch.randn(8, 4)
    good = file_span(w, "w")
    bad = FileSpan(good.fd, 10_000, w.dtype, tuple(w.shape))  # past the end of its 128-byte file
    tier = RamTier({"w": ((8, 4), torch.float32)}, slots=1, pin=False)
    engine, dst = TransferEngine(torch.device("cpu")), torch.zeros(8, 4)

    def copy(span: FileSpan):
        src = tier.sources((0, 0), [Piece("w", 0, w, span)])
        transfer = engine.submit(src, [dst])
        tier.used_by((0, 0), transfer)
        return src, transfer

    with pytest.raises(RuntimeError, match="the checkpoint shard is truncated"):
        copy(bad)[1].wait()
    src, transfer = copy(good)
    transfer.wait()
    assert isinstance(src[0], FileSpan) and torch.equal(dst, w) and (tier.hits, tier.misses) == (0, 2)
    src, transfer = copy(good)
    transfer.wait()
    assert isinstance(src[0], torch.Tensor) and torch.equal(src[0], w) and (tier.hits, tier.misses) == (1, 2)
    engine.shutdown()
