"""moe.capacity inside vllm-ascend's real MoE code, on CPU, over two gloo ranks: 0.23.0.post1
in the vLLM 0.23 environment, 0.18.0 and 0.13.0 in the vLLM 0.18 and 0.13 ones (each release
pairs with one vLLM; 0.13.0's older API: emulation/contract_worker_0_13.py).

One run of tests/ascend/emulation/contract_worker.py per module (two processes, about 30 s):
each rank applies the ascend site set with the real Patcher and runs vllm-ascend's own
AscendFusedMoE.forward_impl -> select_experts -> MoECommMethod.fused_experts -> dispatcher ->
unified_apply_mlp -> combine -> finalize, with torch_npu's ops emulated (emulation/npu_ops.py)
and real all_to_all_single / all_gather over gloo. TP = EP = 2: on the all-to-all path each
rank's rows are its own half of the tokens. The same ranks then run layers with vllm-ascend's
real W8A8_DYNAMIC and W4A8_DYNAMIC schemes (quantized ops: emulation/quant_ops.py), and the
unquantized and W8A8_DYNAMIC layers once more with overflow: reroute. The tests below check
what the ranks recorded.
Nothing here runs on an NPU: op semantics come from CANN's documentation and vllm-ascend's
own golden (see npu_ops.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ascend_patch.core.catalog import lookup
from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.planner.capacity import plan_drops
from tests.ascend import harness
from tests.ascend.emulation import contract_worker as worker

E, K, LOCAL = worker.EXPERTS, worker.TOP_K, worker.EXPERTS // 2
UNSENT = E + 1
OWNER = torch.arange(E) // LOCAL  # physical expert id -> EP rank
LAYER = "model.layers.3.mlp.experts"


@pytest.fixture(scope="module")
def line():
    return harness.require_line(tuple(worker.RELEASES))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, line):
    source = harness.require_source(harness.RELEASES[line])
    return harness.run_ranks(source, tmp_path_factory.mktemp("ascend-contract"), line=line)


def moe_reference(hidden, ids, weights):
    """Plain torch MoE over physical expert ids, one process: rows with a weight of 0 or an id
    outside [0, E) contribute nothing."""
    w13, w2 = worker._expert_weights(torch.Generator().manual_seed(7))
    out = torch.zeros_like(hidden, dtype=torch.float32)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e, w = int(ids[t, j]), float(weights[t, j])
            if 0 <= e < E and w != 0.0:
                gate_up = hidden[t].float() @ w13[e]
                out[t] += w * ((F.silu(gate_up[:worker.INTER]) * gate_up[worker.INTER:]) @ w2[e])
    return out


def kept(ids):
    return (ids >= 0) & (ids < E)


def owner_of(ids):
    """EP rank of each row's physical expert; -1 for a row not sent anywhere."""
    return torch.where(kept(ids), OWNER[ids.clamp(0, E - 1).long()], -1)


def token_sources(seen, path):
    """Per-rank records of one call, one per source of tokens, in token order: both ranks on
    the all-to-all path (TP rank r holds the r-th half); on the all-gather path every rank
    holds every token, so rank 0's."""
    return seen if path == "all_to_all" else seen[:1]


def dispatched(ranks, path):
    """Every token's rows as its dispatcher received them, in token order."""
    seen = token_sources([r[path]["dispatch_in"] for r in ranks], path)
    return tuple(torch.cat([s[key] for s in seen]) for key in ("hidden", "ids", "weights"))


def routed(ranks, path):
    """The router's physical ids and weights before any drop, in token order."""
    seen = token_sources([r[path]["fused_in"] for r in ranks], path)
    return torch.cat([s["ids"] for s in seen]), torch.cat([s["weights"] for s in seen])


# -- installation -------------------------------------------------------------------------


def test_every_site_installs_and_every_interface_is_checked_live(ranks, line):
    site_set = lookup("moe.capacity").site_set(line, "ascend")
    for result in ranks:
        record = result["record"]
        assert record["status"] == "applied"
        assert sorted(record["roles"]) == sorted(s.role for s in site_set.sites)
        # The `from moe_runtime_args import build_token_dispatch_input` copy the comm
        # method calls is the one rewritten.
        assert record["copies"] == list(worker.RELEASES[line].copies)
        assert record["unchecked"] == []
        assert sorted(record["checked"]) == sorted(i.target for i in site_set.relies_on)


# -- all-to-all path ------------------------------------------------------------------------


def test_all_to_all_drops_rows_and_caps_every_rank_alike(ranks):
    stats = [r["stats"]["layers"][LAYER] for r in ranks]
    assert stats[0] == stats[1]  # same capacity, same global counts on both ranks
    assert stats[0]["rows_dropped"] > 0
    _, ids, _ = dispatched(ranks, "all_to_all")
    dropped = int((ids == UNSENT).sum())
    assert 0 < dropped <= CapacityOptions(**worker.DROP_OPTIONS).drop_token_ratio * ids.numel()


def test_all_to_all_plan_equals_a_single_process_plan(ranks):
    """The two ranks each planned their own half after exchanging counts; one process with
    both halves' counts in hand decides the same rows and the same capacity."""
    options = CapacityOptions(**worker.DROP_OPTIONS)
    halves = [(r["all_to_all"]["fused_in"]["weights"], r["all_to_all"]["fused_in"]["ids"])
              for r in ranks]
    counts = []
    for weights, ids in halves:
        plan_drops(weights, ids, num_experts=E, ep_size=2, options=options, expert_owner=OWNER,
                   all_gather_counts=lambda c: counts.append(c) or c.unsqueeze(0))
    both = torch.stack(counts)
    for rank, (weights, ids) in enumerate(halves):
        plan = plan_drops(weights, ids, num_experts=E, ep_size=2, options=options,
                          expert_owner=OWNER, all_gather_counts=lambda c: both, rank=rank)
        sent = ranks[rank]["all_to_all"]["dispatch_in"]["ids"]
        assert torch.equal(plan.keep, sent != UNSENT)
        assert plan.capacity == ranks[rank]["stats"]["layers"][LAYER]["capacity_last"]


def test_all_to_all_bins_physical_ids_by_their_owner(ranks, line):
    """The hot logical experts all map (log2phy) to rank 1's slots: the load the planner saw
    is the physical one, and every dropped row was headed for rank 1. (0.13.0's unquantized
    method never hands log2phy to fused_experts, fused_moe.py:153-162: its ids stay logical
    and the hot experts sit on both ranks.)"""
    ids, _ = routed(ranks, "all_to_all")
    physical_peak = int(torch.bincount(OWNER[ids.long()].view(-1), minlength=2).max())
    stats = ranks[0]["stats"]["layers"][LAYER]
    assert stats["max_bin_load_before_peak"] == physical_peak
    sent = dispatched(ranks, "all_to_all")[1]
    heading = set(OWNER[ids[sent == UNSENT].long()].tolist())
    assert heading == ({0, 1} if worker.RELEASES[line].old_api else {1})


def test_all_to_all_dropped_rows_are_neither_sent_nor_computed(ranks):
    for result in ranks:
        seen = result["all_to_all"]
        sent = seen["dispatch_in"]["ids"]
        keep = sent != UNSENT
        (permute,) = seen["permute"]
        assert permute["num_out_tokens"] == permute["rows"] == int(keep.sum())
        dispatch, combine = seen["a2a"]
        # Split sizes per destination rank count exactly the kept rows it owns.
        per_owner = torch.bincount(owner_of(sent[keep]), minlength=2).tolist()
        assert dispatch["in_splits"] == per_owner and dispatch["rows_in"] == int(keep.sum())
        assert combine["out_splits"] == dispatch["in_splits"]
    # What each rank received, and so computed, is what the capacity allows.
    capacity = ranks[0]["stats"]["layers"][LAYER]["capacity_last"]
    _, all_sent, _ = dispatched(ranks, "all_to_all")
    for rank, result in enumerate(ranks):
        received = sum(result["all_to_all"]["a2a"][0]["out_splits"])
        assert received == int((owner_of(all_sent) == rank).sum()) <= capacity


def test_all_to_all_output_is_the_dropless_output_of_the_kept_rows(ranks):
    """vllm-ascend's own dropless path with weight 0 on the dropped rows gives the same
    routed output as the drop path (which never sent them)."""
    for result in ranks:
        seen = result["dropless_with_kept_weights"]
        assert int((1 - seen["keep"]).sum()) > 0
        torch.testing.assert_close(seen["drop_routed"], seen["routed"], rtol=1e-6, atol=1e-6)


def test_all_to_all_matches_a_single_process_reference(ranks):
    hidden, ids, weights = dispatched(ranks, "all_to_all")
    routed_ids, routed_weights = routed(ranks, "all_to_all")
    keep = ids != UNSENT
    assert torch.equal(ids[keep], routed_ids[keep])
    assert torch.equal(weights[keep], routed_weights[keep]) and not weights[~keep].any()
    expected = moe_reference(hidden, routed_ids, routed_weights * keep)
    for result in ranks:  # finalize all-gathers the TP halves: every rank has every token
        torch.testing.assert_close(result["all_to_all"]["out"], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, ranks[0]["unpatched"]["all_to_all"], atol=1e-3)


def test_combine_without_the_zero_rows_reads_past_the_received_rows(ranks):
    """Planted bug: vllm-ascend's own _combine_postprocess on the shortened permutation."""
    for result in ranks:
        assert result["combine_pad_needed"].startswith("failed: sorted_indices reach row")


def test_a_rank_that_sends_nothing_gets_zeros_and_the_other_is_unaffected(ranks):
    zero, other = ranks[0]["nothing_sent"], ranks[1]["nothing_sent"]
    assert zero["a2a"][0]["in_splits"] == [0, 0] and zero["a2a"][0]["rows_in"] == 0
    assert not zero["out"].any()
    expected = moe_reference(other["hidden"], other["ids"], other["weights"])
    torch.testing.assert_close(other["out"], expected, rtol=1e-5, atol=1e-5)


# -- all-gather path ------------------------------------------------------------------------


def test_allgather_marks_dropped_rows_minus_one_with_weight_zero(ranks):
    assert torch.equal(ranks[0]["allgather"]["dispatch_in"]["ids"],
                       ranks[1]["allgather"]["dispatch_in"]["ids"])  # no exchange needed
    hidden, ids, weights = dispatched(ranks, "allgather")
    routed_ids, routed_weights = routed(ranks, "allgather")
    dropped = ids == -1
    assert dropped.any() and not weights[dropped].any()
    assert torch.equal(ids[~dropped], routed_ids[~dropped])
    assert torch.equal(weights[~dropped], routed_weights[~dropped])
    for result in ranks:
        assert result["allgather"]["gathers"] == 0


def test_allgather_computes_only_kept_local_rows(ranks):
    for rank, result in enumerate(ranks):
        ids = result["allgather"]["dispatch_in"]["ids"]
        (routing,) = result["allgather"]["routing"]
        local = ids[owner_of(ids) == rank] - rank * LOCAL
        assert routing["expert_tokens"].tolist() == torch.bincount(local.long(),
                                                                    minlength=LOCAL).tolist()


def test_allgather_matches_a_single_process_reference(ranks):
    hidden, ids, _ = dispatched(ranks, "allgather")
    routed_ids, routed_weights = routed(ranks, "allgather")
    expected = moe_reference(hidden, routed_ids, routed_weights * kept(ids))
    for result in ranks:  # partial outputs summed over the EP ranks, as AscendMoERunner does
        torch.testing.assert_close(result["allgather"]["out"], expected, rtol=1e-5, atol=1e-5)


# -- r = 0, kept-whole steps, refusals ----------------------------------------------------


def test_ratio_zero_is_bit_identical_to_vllm_ascend(ranks):
    for result in ranks:
        for path in ("all_to_all", "allgather"):
            assert torch.equal(result["ratio0"][path], result["unpatched"][path])
        layer = result["ratio0_stats"]["layers"][LAYER]
        assert layer["calls"] == 2 and layer["rows_dropped"] == 0


def test_mc2_fused_mc2_capture_and_lora_steps_keep_every_row(ranks, line):
    # 0.18.0 and 0.13.0 have no MoE LoRA path (no lora_context in MoEFusedExpertsInput);
    # 0.13.0's FUSED_MC2 never reaches a dispatcher (and takes only w8a8_dynamic models).
    release = worker.RELEASES[line]
    cases_kept = ("MC2", *(() if release.old_api else ("FUSED_MC2",)), "graph capture",
                  *(("MoE LoRA",) if release.lora else ()))
    for result in ranks:
        cases = result["kept_whole"]
        assert set(cases) == {*cases_kept, "quantized_current"}
        for case in cases_kept:
            assert cases[case] == {"same_ids": True, "same_weights": True}, case
        assert result["stats"]["ascend"]["kept_whole"] == {case: 1 for case in cases_kept}


def test_a_method_that_is_not_vllm_ascends_is_reported_not_taken_over(ranks):
    expected = "MoE method SimpleNamespace is neither"
    for result in ranks:
        assert result["kept_whole"]["quantized_current"]
        reason = result["stats"]["layers_not_taken_over"]["model.layers.9.mlp.experts"]
        assert reason.startswith(expected)


def test_enable_fused_mc2_with_drops_is_refused_naming_the_config_line(ranks, line):
    setting = ("VLLM_ASCEND_ENABLE_FUSED_MC2=1" if worker.RELEASES[line].fused_mc2_env
               else "enable_fused_mc2: 1")
    messages = [result["fused_mc2"] for result in ranks]
    if worker.RELEASES[line].old_api:  # 0.13.0 sends only w8a8_dynamic models to FUSED_MC2
        assert [m["unquantized"] for m in messages] == ["ran", "ran"]
        messages = [m["W8A8_DYNAMIC"] for m in messages]
    for message in messages:
        assert message.startswith("PatchError: ascend-contract.yaml:7: patch 'capacity'")
        assert f"vllm-ascend's {setting} on A3" in message and "FUSED_MC2" in message


def test_config_is_checked_over_the_ep_group_once(ranks):
    for result in ranks:
        assert result["stats"]["config_checked_over_ranks"] == 2


# -- quantized schemes (real W8A8_DYNAMIC / W4A8_DYNAMIC apply, emulated quant ops) ---------

SCHEMES = ("W8A8_DYNAMIC", "W4A8_DYNAMIC")
QUANT_LAYER = {"W8A8_DYNAMIC": "model.layers.11.mlp.experts",
               "W4A8_DYNAMIC": "model.layers.12.mlp.experts"}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_layer_is_taken_over_and_its_row_names_the_scheme(ranks, scheme):
    rows = [r["quant_stats"]["layers"][QUANT_LAYER[scheme]] for r in ranks]
    assert rows[0] == rows[1]  # same cap, same counts on every rank
    assert rows[0]["quant"] == scheme and rows[0]["rows_dropped"] > 0
    assert rows[0]["calls"] == 2  # one all-to-all, one all-gather call
    for result in ranks:
        assert QUANT_LAYER[scheme] in result["quant_stats"]["layers_taken_over"]
        assert result["quant_stats"]["layers"][LAYER]["quant"] == "unquantized"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_all_to_all_neither_quantizes_sends_nor_computes_dropped_rows(ranks, scheme):
    for result in ranks:
        seen = result["quant"][scheme]["all_to_all"]
        ids = seen["dispatch_in"]["ids"]
        keep = ids != UNSENT
        assert int((~keep).sum()) > 0
        scales, rows, combine = seen["a2a"]  # dynamic scales first, then the int8 rows
        per_owner = torch.bincount(owner_of(ids[keep]), minlength=2).tolist()
        assert scales["in_splits"] == rows["in_splits"] == per_owner
        assert scales["rows_in"] == rows["rows_in"] == int(keep.sum())
        assert seen["quant_rows"][0] == seen["permute"][0]["rows"] == int(keep.sum())
        received = sum(rows["out_splits"])
        assert scales["out_splits"] == rows["out_splits"] == combine["in_splits"]
        assert seen["mlp_rows"] == seen["mlp_scales"] == [received]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_allgather_quantizes_and_computes_only_kept_local_rows(ranks, scheme):
    for rank, result in enumerate(ranks):
        seen = result["quant"][scheme]["allgather"]
        ids = seen["dispatch_in"]["ids"]
        assert (ids == -1).any() and not seen["dispatch_in"]["weights"][ids == -1].any()
        (routing,) = seen["routing"]
        assert routing["quant_mode"] == 1  # the dynamic quant fused into the routing op
        local = ids[owner_of(ids) == rank] - rank * LOCAL
        assert routing["expert_tokens"].tolist() == torch.bincount(
            local.long(), minlength=LOCAL).tolist()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("path", ["all_to_all", "allgather"])
def test_quantized_kept_rows_give_the_dropless_quantized_output(ranks, scheme, path):
    """vllm-ascend's own dropless quantized path with weight 0 on the dropped rows: the same
    routed output, bit for bit (quantization is per row, so a kept row quantizes alike)."""
    for result in ranks:
        seen = result["quant"][scheme][path]
        assert torch.equal(seen["routed"], seen["dropless_kept"])
        assert not torch.equal(seen["out"], result["quant_unpatched"][scheme][path])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_output_is_close_to_the_float_moe_of_the_kept_rows(ranks, scheme):
    """The emulated int8 path against plain float math on the dequantized weights: within
    the per-token activation quantization error."""
    w13, w2 = ranks[0]["quant_weights"][scheme]
    seen = [r["quant"][scheme]["all_to_all"] for r in ranks]
    hidden = torch.cat([s["dispatch_in"]["hidden"] for s in seen]).float()
    ids = torch.cat([s["dispatch_in"]["ids"] for s in seen])
    weights = torch.cat([s["fused_in"]["weights"] for s in seen]).float()
    expected = _float_moe(hidden, ids, weights * (ids != UNSENT), w13, w2)
    out = ranks[0]["quant"][scheme]["all_to_all"]["out"].float()
    assert float((out - expected).norm() / expected.norm()) < 0.03


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_ratio_zero_is_bit_identical_to_vllm_ascend(ranks, scheme):
    for result in ranks:
        for path in ("all_to_all", "allgather"):
            assert torch.equal(result["quant_ratio0"][scheme][path],
                               result["quant_unpatched"][scheme][path])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_rank_with_zero_rows_skips_the_mlp_and_gets_zeros(ranks, scheme):
    zero, other = (r["quant"][scheme]["zero_rows"] for r in ranks)
    for record in zero["a2a"]:  # scales, rows, combine: nothing either way
        assert record["in_splits"] == [0, 0] and record["out_splits"] == [0, 0]
    assert zero["quant_rows"] == [0]  # aclnnDynamicQuant documents empty input
    assert zero["mlp_rows"] == []  # the strict gmm ops refuse empty input: never called
    assert not zero["out"].any() and zero["out"].shape == zero["hidden"].shape
    quant_type = {"W8A8_DYNAMIC": "W8A8", "W4A8_DYNAMIC": "W4A8"}[scheme]
    assert ranks[0]["quant_stats"]["ascend"]["zero_row_mlp_skipped"][quant_type] == 1
    # Planted bug: without the guard the (strict) quantized grouped matmul gets empty input.
    assert zero["unguarded"].startswith("failed: empty x: not documented for ")
    assert "zero_row_mlp_skipped" not in ranks[1]["quant_stats"]["ascend"]
    assert other["a2a"][1]["out_splits"] == [0, int((other["ids"] != UNSENT).sum())]
    w13, w2 = ranks[0]["quant_weights"][scheme]
    expected = _float_moe(other["hidden"].float(), other["ids"], other["weights"].float(), w13, w2)
    assert float((other["out"].float() - expected).norm() / expected.norm()) < 0.03


def _float_moe(hidden, ids, weights, w13, w2):
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e, w = int(ids[t, j]), float(weights[t, j])
            if 0 <= e < E and w != 0.0:
                gate_up = hidden[t] @ w13[e]
                out[t] += w * ((F.silu(gate_up[:worker.INTER]) * gate_up[worker.INTER:]) @ w2[e])
    return out


# -- overflow: reroute (prepare's logits, scored per physical expert) ----------------------

LOG2PHY = torch.tensor(worker.LOG2PHY)
REROUTE_CASES = [(kind, path) for kind in ("unquantized", "W8A8_DYNAMIC")
                 for path in ("all_to_all", "allgather")]


def _logits_of(path, rank):
    """The router logits of the rows a rank routes: its TP half on the all-to-all path."""
    _, logits = worker._inputs(torch.Generator().manual_seed(11))
    return torch.tensor_split(logits, 2)[rank] if path == "all_to_all" else logits


def _sources(ranks, kind, path):
    """What each source of tokens saw in the reroute run, for that layer kind."""
    return token_sources([r["reroute"][kind][path] for r in ranks], path)


def _drop_sources(ranks, kind, path):
    """The same in the drop run (the quantized layers' records are under "quant")."""
    return token_sources([(r if kind == "unquantized" else r["quant"][kind])[path]
                          for r in ranks], path)


def _expected_reroute(ranks, kind, path):
    """Per source: the plan one process makes with every source's counts and this source's
    scores (the router's softmax, moved to the physical ids its ids went through), and
    whether its ids went through log2phy."""
    options = CapacityOptions(**worker.REROUTE_OPTIONS)
    inputs, mapped = [], []
    for rank, s in enumerate(_sources(ranks, kind, path)):
        scores = _logits_of(path, rank).softmax(dim=-1)
        logical = scores.topk(K, dim=-1).indices
        ids = s["fused_in"]["ids"].long()
        # 0.13.0's unquantized method does not hand fused_experts its log2phy: ids stay logical.
        log2phy = LOG2PHY if torch.equal(ids, LOG2PHY[logical]) else None
        assert log2phy is not None or torch.equal(ids, logical)
        mapped.append(log2phy is not None)
        physical = scores.clone()
        if log2phy is not None:  # logical expert l's score is physical id LOG2PHY[l]'s
            physical[:, LOG2PHY] = scores
        inputs.append((s["fused_in"]["weights"].float(), s["fused_in"]["ids"], physical))
    counts = []
    for weights, ids, scores in inputs:
        plan_drops(weights, ids, num_experts=E, ep_size=2, options=options, expert_owner=OWNER,
                   all_gather_counts=lambda c: counts.append(c) or c.unsqueeze(0),
                   router_scores=scores)
    gathered = torch.stack(counts) if path == "all_to_all" else None
    plans = [plan_drops(weights, ids, num_experts=E, ep_size=2, options=options,
                        expert_owner=OWNER, rank=rank, router_scores=scores,
                        all_gather_counts=None if gathered is None else lambda c: gathered)
             for rank, (weights, ids, scores) in enumerate(inputs)]
    return plans, all(mapped)


def _rank_loads(ids):
    return torch.bincount(owner_of(ids)[kept(ids)], minlength=2)


@pytest.mark.parametrize("kind,path", REROUTE_CASES)
def test_reroute_sends_what_one_process_with_every_source_s_counts_and_scores_plans(
        ranks, kind, path):
    """Each source rerouted its own overflow into the room its share of the gathered counts
    gave it, with the scores of the logits prepare handed on: exactly the single-process
    plan; dropped rows unsent as with drop, rerouted ones sent to their new expert."""
    unsent = UNSENT if path == "all_to_all" else -1
    plans, mapped = _expected_reroute(ranks, kind, path)
    for plan, seen in zip(plans, _sources(ranks, kind, path), strict=True):
        sent = seen["dispatch_in"]
        ids = torch.where(plan.keep, plan.topk_ids, unsent).to(sent["ids"].dtype)
        assert torch.equal(sent["ids"], ids)
        assert torch.equal(sent["weights"], plan.weights.to(sent["weights"].dtype))
    # With log2phy the hot experts all sit on rank 1 and rank 0 has room; 0.13.0's
    # unquantized ids stay logical, the hot experts sit on both ranks and none has room.
    assert (sum(int(p.local_rerouted_rows) for p in plans) > 0) == mapped


@pytest.mark.parametrize("kind,path", REROUTE_CASES)
def test_reroute_keeps_every_rank_under_the_drop_plans_cap(ranks, kind, path):
    """No rank above the cap, the bottleneck drop's, and the overflow computed elsewhere
    (more rows than drop) wherever there was room; a token never gets one expert twice."""
    plans, mapped = _expected_reroute(ranks, kind, path)
    capacity = int(plans[0].capacity)
    assert all(int(p.capacity) == capacity for p in plans)
    rerouted = torch.cat([s["dispatch_in"]["ids"] for s in _sources(ranks, kind, path)])
    dropped = torch.cat([s["dispatch_in"]["ids"] for s in _drop_sources(ranks, kind, path)])
    load_reroute, load_drop = _rank_loads(rerouted), _rank_loads(dropped)
    assert int(load_reroute.max()) <= capacity
    assert int(load_reroute.max()) == int(load_drop.max())
    assert (int(load_reroute.sum()) > int(load_drop.sum())) == mapped
    for row, mask in zip(rerouted, kept(rerouted), strict=True):
        assert len(set(row[mask].tolist())) == int(mask.sum())


@pytest.mark.parametrize("path", ["all_to_all", "allgather"])
def test_reroute_output_is_the_moe_of_the_rows_it_sent(ranks, path):
    seen = [s["dispatch_in"] for s in _sources(ranks, "unquantized", path)]
    hidden = torch.cat([s["hidden"] for s in seen])
    ids = torch.cat([s["ids"] for s in seen])
    weights = torch.cat([s["weights"] for s in seen])
    expected = moe_reference(hidden, ids, weights * kept(ids))
    for result in ranks:
        torch.testing.assert_close(result["reroute"]["unquantized"][path]["out"], expected,
                                   rtol=1e-5, atol=1e-5)


def test_reroute_counts_rerouted_rows_per_layer(ranks):
    """The report's rows_rerouted: this process's rerouted rows of the layer's two calls."""
    plans = {case: _expected_reroute(ranks, *case)[0] for case in REROUTE_CASES}
    for rank, result in enumerate(ranks):
        rows = result["reroute_stats"]["layers"]
        for kind, layer in (("unquantized", LAYER), ("W8A8_DYNAMIC", QUANT_LAYER["W8A8_DYNAMIC"])):
            expected = (int(plans[kind, "all_to_all"][rank].local_rerouted_rows)
                        + int(plans[kind, "allgather"][0].local_rerouted_rows))
            assert rows[layer]["rows_rerouted"] == expected
            assert rows[layer]["calls"] == 2


def test_reroute_at_ratio_zero_is_bit_identical_to_vllm_ascend(ranks):
    for result in ranks:
        for path in ("all_to_all", "allgather"):
            assert torch.equal(result["reroute_ratio0"][path], result["unpatched"][path])
