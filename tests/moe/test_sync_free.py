"""The drop step never stalls the device: no host read, no data-dependent shape.

On an NPU or GPU a host read (`.item()`, `int(t)`, a copy to the host) or an op whose output
size depends on the data (`nonzero`, `unique`, boolean-mask indexing, `bincount`) waits for
the device's queue to drain. On the CPU there is no queue, so these tests count the ops that
*would* stall a device (lab/sync_count.py: a TorchDispatchMode that sees every aten op the
step runs), on the router's output at the seed's scale (28,672 tokens x top-8, 256 experts,
EP16 simulated) and at a decode batch. The plan's counters reach the process report through
`CapacityStats.fold`, which reads them back once per fold, not per call.
"""

from __future__ import annotations

import functools

import pytest
import torch

from ascend_patch.impls.moe.drop_step import DropStep
from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.planner import reroute
from ascend_patch.impls.moe.telemetry import stats as stats_module
from ascend_patch.impls.moe.telemetry.stats import CapacityStats
from ascend_patch.lab.sync_count import HostReads, SyncCounter


@pytest.fixture(autouse=True)
def _fold_as_on_an_accelerator(monkeypatch):
    # The CPU folds the counters after every call (a read back costs nothing there); what is
    # counted here is the accelerator's path, which folds at the report only.
    monkeypatch.setattr(stats_module, "FOLD_AT_ONCE_ON", frozenset())


@functools.lru_cache(maxsize=8)
def routing(tokens: int, top_k: int = 8, experts: int = 256, seed: int = 0, skew: float = 1.0):
    """(weights [T, k], ids [T, k], scores [T, E]): a softmax router over skewed logits
    (made once per arguments: the step never writes its inputs)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen)
    logits += skew * torch.linspace(0, 2, experts)[torch.randperm(experts, generator=gen)]
    scores = logits.softmax(dim=-1)
    weights, ids = scores.topk(top_k, dim=-1)
    return weights, ids, scores


SEED = 28_672  # tokens of the seed's prefill, top-8, 256 experts, EP16
DECODE = 64


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a loaded CI machine more only contend (the seed's scale runs
    in well under a second this way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def counted_step(options: CapacityOptions, gather=None, rank: int = 0):
    stats = CapacityStats({}, log_interval=0)
    step = DropStep(num_experts=256, ep_size=1, options=options, gather=gather, rank=rank,
                    on_plan=lambda plan: stats.record("L", plan))
    return step, stats


def run_counted(step, weights, ids, scores=None):
    with SyncCounter() as counter:
        out = step(weights, ids, scores)
    return out, counter


def options(**values) -> CapacityOptions:
    return CapacityOptions(**{"drop_token_ratio": 0.1, "simulate_ep_size": 16,
                              "min_tokens": 0, **values})


@pytest.mark.parametrize("tokens", [SEED, DECODE])
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_the_drop_step_reads_nothing_back_on_one_token_source(tokens, policy):
    weights, ids, _ = routing(tokens)
    step, stats = counted_step(options(drop_policy=policy, renormalize=True))
    (out_weights, out_ids), counter = run_counted(step, weights, ids)
    assert counter.syncs == []
    assert counter.ops > 20  # the mode saw the step
    stats.fold()  # the report's one read, off the hot path
    dropped = stats._stats["rows_dropped"]
    assert 0 < dropped <= tokens * 8 // 10
    assert int((out_ids < 0).sum()) == dropped


@pytest.mark.parametrize("tokens", [SEED, DECODE])
def test_the_all_gather_path_reads_nothing_back(tokens):
    """With data parallelism the counts of every source are all-gathered on the device; the
    water level and the quotas are computed from them there."""
    weights, ids, _ = routing(tokens)
    other = routing(tokens // 2, seed=1)[1]  # a second DP rank's routing
    other_counts = torch.stack([torch.zeros(257, dtype=torch.int64).index_add_(
        0, other.reshape(-1), torch.ones(other.numel(), dtype=torch.int64))[:256],
        torch.zeros(256, dtype=torch.int64)])
    step, _ = counted_step(options(keep_top1=False),
                           gather=lambda counts: torch.stack([other_counts, counts]), rank=1)
    (_, out_ids), counter = run_counted(step, weights, ids)
    assert counter.syncs == []
    assert bool((out_ids < 0).any())


def test_masked_slots_float64_weights_and_the_no_drop_path_read_nothing_back():
    weights, ids, _ = routing(DECODE)
    ids = ids.clone()
    ids[::7, -1] = -1  # vLLM's masked slots
    for opts in (options(), options(min_tokens=256), options(drop_token_ratio=0.0)):
        step, _ = counted_step(opts)
        (_, out_ids), counter = run_counted(step, weights.double(), ids)
        assert counter.syncs == []
        assert torch.equal(out_ids < 0, (ids < 0) | (out_ids < 0))


def test_reroute_reads_one_flag_per_round_on_the_cpu_and_nothing_on_a_device(monkeypatch):
    """overflow: reroute runs its top_k + bins placement rounds statically on a device. On
    the CPU it stops once nothing is proposed, which reads one flag per round run."""
    weights, ids, scores = routing(DECODE)
    step, stats = counted_step(options(overflow="reroute"))
    cpu_out, cpu_counter = run_counted(step, weights, ids, scores)
    # This routing places its overflow in 4 rounds; the 5th proposes nothing and stops.
    assert cpu_counter.syncs == ["aten._local_scalar_dense.default"] * 5
    monkeypatch.setattr(reroute, "stop_early", lambda device: False)  # as on a device
    device_out, counter = run_counted(step, weights, ids, scores)
    assert counter.syncs == []
    assert all(torch.equal(a, b) for a, b in zip(cpu_out, device_out, strict=True))
    stats.fold()
    assert stats._stats["layers"]["L"]["rows_rerouted"] > 0


def test_reroute_at_the_seeds_scale_reads_nothing_back_on_a_device(monkeypatch):
    weights, ids, scores = routing(SEED)
    step, _ = counted_step(options(overflow="reroute"))
    monkeypatch.setattr(reroute, "stop_early", lambda device: False)
    (_, out_ids), counter = run_counted(step, weights, ids, scores)
    assert counter.syncs == []
    assert bool(((out_ids != ids) & (out_ids >= 0)).any())  # some rows rerouted


def test_the_counter_flags_what_would_stall_a_device():
    """The counter itself: it must see the ops the old planner ran."""
    t = torch.tensor([3, 1, 3, 0])
    with SyncCounter() as counter:
        int(t.max())
        t[t > 0]
        torch.unique(t)
        t.nonzero()
        torch.bincount(t)
        t.cpu()
    assert len(counter.syncs) >= 5



def test_host_reads_sees_the_reads_the_cpu_makes_no_ops():
    """On the CPU `tolist` and `cpu` of a CPU tensor run no aten op: only the function mode
    sees them (a device would copy to the host there); moves and arithmetic are no reads."""
    t = torch.tensor([3, 1])
    with SyncCounter() as counter, HostReads() as reads:
        t.tolist()
        t.cpu()
        int(t[0])
        (t + 1).to(t.device)
        torch.tensor([1])
    assert reads.reads == ["tolist", "cpu", "__int__"]
    assert reads.uploads == ["tensor"]
    assert counter.syncs == ["aten._local_scalar_dense.default"]  # int() only

def test_the_step_compiles_whole():
    """torch.compile(fullgraph=True) raises on any graph break, so a capture proves the
    step has none. The "eager" backend runs the captured graph op by op: it tests the
    capture only (inductor would generate and compile C++ here: a toolchain and minutes).
    Reroute is captured on a small layer (2 ranks, top-1): its top_k + bins rounds are
    unrolled in the graph, and 24 of them would take seconds to trace."""
    weights, ids, scores = routing(DECODE)
    small = routing(DECODE, top_k=1, experts=4)
    cases = ((256, options(), (weights, ids)),
             (4, options(overflow="reroute", simulate_ep_size=2, keep_top1=False,
                         drop_token_ratio=0.3), small))
    for experts, opts, args in cases:
        stats = CapacityStats({}, log_interval=0)
        step = DropStep(num_experts=experts, ep_size=1, options=opts,
                        on_plan=lambda plan, stats=stats: stats.record("L", plan))
        expected = step(*args)
        torch._dynamo.reset()
        got = torch.compile(step, fullgraph=True, backend="eager")(*args)
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
        stats.fold()
        assert stats._stats["calls"] == 2 and stats._stats["rows_dropped"] > 0
