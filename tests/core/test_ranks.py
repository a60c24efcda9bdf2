"""How a process is named in reports and on /metrics: role and ranks (core/ranks.py)."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import sys
import types

import pytest

from ascend_patch.core import ranks, report
from ascend_patch.core.ranks import Identity, label, role_of

RANK_KEYS = ("node", "dp", "pp", "tp", "ep")


@pytest.mark.parametrize("role", ranks.ROLES)
@pytest.mark.parametrize("known", [
    c for n in range(len(RANK_KEYS) + 1) for c in itertools.combinations(RANK_KEYS, n)])
def test_every_role_with_every_set_of_known_ranks(role, known):
    """A rank appears exactly when known, in the order node, dp, pp, tp, ep; the label splits
    back into its parts."""
    values = {key: i + 1 for i, key in enumerate(RANK_KEYS) if key in known}
    got = label(role, **values)
    assert got == "-".join([role, *(f"{key}{values[key]}" for key in RANK_KEYS if key in known)])
    first, *rest = got.split("-")
    assert first == role and [part.rstrip("0123456789") for part in rest] == list(known)


@pytest.mark.parametrize(("role", "ranks_", "expected"), [
    ("api_server", {}, "api_server"),
    ("api_server", {"index": 1}, "api_server1"),
    ("api_server", {"dp": 3}, "api_server-dp3"),  # 0.32's DP supervisor: one per DP rank
    ("headless", {}, "headless"),
    ("main", {}, "main"),
    ("main", {"dp": 0, "tp": 0}, "main-dp0-tp0"),  # an offline LLM running its model in-process
    ("dp_coordinator", {}, "dp_coordinator"),
    ("engine_core", {}, "engine_core"),
    ("engine_core", {"dp": 1}, "engine_core-dp1"),
    ("engine_core", {"dp": 1, "tp": 0, "ep": 1}, "engine_core-dp1-tp0-ep1"),  # in-process worker
    ("worker", {}, "worker"),  # before its process groups exist
    ("worker", {"dp": 0, "tp": 0}, "worker-dp0-tp0"),  # a dense model: no EP group
    ("worker", {"dp": 1, "tp": 0, "ep": 1}, "worker-dp1-tp0-ep1"),
    ("worker", {"dp": 0, "tp": 1, "ep": 1}, "worker-dp0-tp1-ep1"),
    ("worker", {"dp": 1, "pp": 1, "tp": 0, "ep": 1}, "worker-dp1-pp1-tp0-ep1"),
    ("worker", {"node": 1, "dp": 3, "tp": 1, "ep": 7}, "worker-node1-dp3-tp1-ep7"),
    ("worker", {"node": 0, "dp": 0, "pp": 0, "tp": 0, "ep": 0}, "worker-node0-dp0-pp0-tp0-ep0"),
    ("other", {}, "other"),
])
def test_labels(role, ranks_, expected):
    assert label(role, **ranks_) == expected
    fields = Identity(role=role, process="p", **{
        {"index": "index"}.get(k, f"{k}_rank"): v for k, v in ranks_.items()}).fields()
    assert fields["label"] == expected and "problem" not in fields


def test_bad_roles_and_ranks_are_refused():
    with pytest.raises(ValueError, match="unknown role 'Worker'"):
        label("Worker")
    with pytest.raises(ValueError, match="dp rank -1 is negative"):
        label("worker", dp=-1)


@pytest.mark.parametrize(("process", "argv", "main_module", "expected"), [
    ("VllmWorker-0", [], None, ("worker", {})),
    ("VllmWorker-3", [], None, ("worker", {})),
    ("EngineCore", [], None, ("engine_core", {})),
    ("EngineCore_DP0", [], None, ("engine_core", {"dp": 0})),
    ("EngineCore_DP12", [], None, ("engine_core", {"dp": 12})),
    ("DPEngineCoreActor_DP2", [], None, ("engine_core", {"dp": 2})),
    ("ApiServer_1", [], None, ("api_server", {"index": 1})),
    ("APIServer_DPRank_3", [], None, ("api_server", {"dp": 3})),
    ("VLLM_DP_Coordinator", [], None, ("dp_coordinator", {})),
    ("Process-1", [], None, ("other", {})),
    ("MainProcess", ["/x/api_server.py", "--model", "m"], "vllm.entrypoints.openai.api_server",
     ("api_server", {})),
    ("MainProcess", ["/venv/bin/vllm", "serve", "m"], "__main__", ("api_server", {})),
    ("MainProcess", ["/venv/bin/vllm", "serve", "m", "--headless"], "__main__", ("headless", {})),
    ("MainProcess", ["/x/vllm_cli.py", "serve", "m", "--headless"], "ascend_patch.cli.vllm_cli",
     ("headless", {})),
    ("MainProcess", ["/venv/bin/vllm", "bench", "serve"], "__main__", ("main", {})),
    ("MainProcess", ["offline.py", "serve"], None, ("api_server", {})),
    ("MainProcess", ["offline.py", "--model", "m"], None, ("main", {})),
    ("MainProcess", [], None, ("main", {})),
    ("MainProcess", ["/venv/lib/python3.11/site-packages/vllm/model_executor/models/registry.py"],
     "vllm.model_executor.models.registry", ("model_inspector", {})),
])
def test_roles_from_vllms_process_names(process, argv, main_module, expected):
    assert role_of(process, argv, main_module) == expected


def _groups(*, initialised=True, dp=(0, 1), tp=(0, 1), pp=(0, 1), ep=(0, 1), nodes=1, world=(0, 1)):
    """A stand-in for vllm.distributed.parallel_state with the declared interfaces."""

    class GroupCoordinator:
        def __init__(self, rank_in_group, world_size, rank=0):
            self.rank_in_group, self.world_size, self.rank = rank_in_group, world_size, rank

    def group(pair):
        def get():
            assert pair is not None, "group is not initialized"
            return GroupCoordinator(*pair)
        return get

    module = types.ModuleType(ranks._PS)
    module.GroupCoordinator = GroupCoordinator
    module.model_parallel_is_initialized = lambda: initialised
    module.get_dp_group, module.get_tp_group = group(dp), group(tp)
    module.get_pp_group, module.get_ep_group = group(pp), group(ep)
    module.get_node_count = lambda: nodes
    module.get_world_group = lambda: GroupCoordinator(world[0], world[1], world[0])
    return module


@pytest.fixture
def process(monkeypatch):
    """Set this process's vLLM name and parallel state: process(name, state or None)."""
    monkeypatch.setattr(ranks, "_known", None)
    monkeypatch.setattr(ranks, "_checked", None)
    monkeypatch.delitem(sys.modules, ranks._PS, raising=False)

    def set_(name, state=None):
        monkeypatch.setattr(ranks.multiprocessing.current_process(), "name", name)
        if state is None:
            monkeypatch.delitem(sys.modules, ranks._PS, raising=False)
        else:
            monkeypatch.setitem(sys.modules, ranks._PS, state)
        return ranks.current()

    return set_


def test_a_worker_before_and_after_its_groups_exist(process):
    assert process("VllmWorker-0").label == "worker"  # vLLM not even imported
    assert process("VllmWorker-0", _groups(initialised=False)).label == "worker"
    got = process("VllmWorker-0", _groups(dp=(1, 2), tp=(0, 1), ep=(1, 2)))
    assert (got.role, got.process, got.label) == ("worker", "VllmWorker-0", "worker-dp1-tp0-ep1")
    assert (got.dp_rank, got.tp_rank, got.pp_rank, got.ep_rank, got.node_rank) == (
        1, 0, None, 1, None)


def test_torn_down_groups_keep_the_name_the_process_served_under(process):
    assert process("VllmWorker-0", _groups(dp=(0, 1), tp=(1, 2), ep=(1, 2))).label == \
        "worker-dp0-tp1-ep1"
    assert process("VllmWorker-0", _groups(initialised=False)).label == "worker-dp0-tp1-ep1"
    assert process("VllmWorker-0", _groups(dp=None)).label == "worker-dp0-tp1-ep1"


def test_pp_node_and_a_model_without_experts(process):
    assert process("VllmWorker-1", _groups(dp=(0, 1), tp=(1, 2), pp=(1, 2), ep=None)).label == \
        "worker-dp0-pp1-tp1"
    # 2 nodes of 4 ranks each: global rank 5 is on node 1.
    got = process("VllmWorker-1", _groups(dp=(1, 2), tp=(1, 4), ep=(5, 8), nodes=2, world=(5, 8)))
    assert got.label == "worker-node1-dp1-tp1-ep5"


def test_an_engine_core_has_the_dp_rank_of_its_name(process):
    assert process("EngineCore_DP1").label == "engine_core-dp1"
    assert process("EngineCore").label == "engine_core"
    # Dense model under DP: vLLM runs each DP rank as an independent engine whose DP group
    # has one member; the name still says which rank it is.
    assert process("EngineCore_DP1", _groups(dp=(0, 1), tp=(0, 1), ep=None)).label == \
        "engine_core-dp1-tp0"
    # A real DP group wins over the name.
    assert process("EngineCore_DP1", _groups(dp=(1, 2), tp=(0, 1))).label == \
        "engine_core-dp1-tp0-ep0"


def test_a_worker_has_the_dp_rank_of_the_engine_core_that_started_it(process, monkeypatch):
    parent = types.SimpleNamespace(name="EngineCore_DP1")
    monkeypatch.setattr(ranks.multiprocessing, "parent_process", lambda: parent)
    assert process("VllmWorker-0").label == "worker-dp1"  # before its groups exist
    # A dense model's DP ranks are independent engines: a DP group of one.
    assert process("VllmWorker-0", _groups(dp=(0, 1), tp=(1, 2), ep=None)).label == \
        "worker-dp1-tp1"
    parent.name = "EngineCore"  # no DP
    monkeypatch.setattr(ranks, "_known", None)
    assert process("VllmWorker-0", _groups(dp=(0, 1), tp=(1, 2), ep=(1, 2))).label == \
        "worker-dp0-tp1-ep1"


def test_a_first_process_without_groups_is_named_by_its_role(process, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/vllm", "serve", "model"])
    got = process("MainProcess", _groups(initialised=False))
    assert (got.label, got.fields()) == ("api_server", {
        "label": "api_server", "role": "api_server", "process": "MainProcess", "dp_rank": None,
        "tp_rank": None, "pp_rank": None, "ep_rank": None, "node_rank": None, "index": None})


def test_a_parallel_state_that_differs_gives_no_ranks_and_says_why(process, monkeypatch):
    state = _groups()
    state.get_dp_group = lambda group_name: None  # a changed signature
    got = process("VllmWorker-0", state)
    assert got.label == "worker"
    assert got.fields()["problem"] == (
        "ranks unknown: vLLM's parallel state differs: vllm.distributed.parallel_state:"
        "get_dp_group has signature (group_name), not () (DP rank (rank_in_group, world_size))")
    monkeypatch.setattr(ranks, "_checked", None)  # checked once per process otherwise
    state = _groups()
    del state.get_node_count
    assert process("VllmWorker-1", state).fields()["problem"] == (
        "ranks unknown: vLLM's parallel state differs: vllm.distributed.parallel_state:"
        "get_node_count (node count, for the node rank): 'vllm.distributed.parallel_state' has "
        "no attribute 'get_node_count'")


def test_the_declared_interfaces_hold_on_the_installed_vllm(monkeypatch):
    pytest.importorskip("vllm")
    import vllm.distributed.parallel_state  # noqa: F401

    monkeypatch.setattr(ranks, "_checked", None)
    assert ranks._interfaces_problem() == ""


def test_vllms_process_names_are_the_ones_parsed():
    """The names role_of reads are still the ones vLLM gives its processes."""
    pytest.importorskip("vllm")
    from vllm.v1 import utils as v1_utils
    from vllm.v1.engine import coordinator, utils
    from vllm.v1.executor import multiproc_executor

    for module, text in (
        (utils, 'name=f"EngineCore_DP{global_index}" if is_dp else "EngineCore"'),
        (multiproc_executor, 'name=f"VllmWorker-{rank}"'),
        (v1_utils, 'name=f"ApiServer_{i}"'),
        (coordinator, 'name="VLLM_DP_Coordinator"'),
    ):
        assert text in inspect.getsource(module), (module.__name__, text)


# ------------------------------------------------------------------------------- report


def test_the_report_is_renamed_once_the_ranks_are_known(process, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_writer_pid", os.getpid())  # no background writer
    report.configure(tmp_path, interval=0)
    try:
        process("VllmWorker-0", _groups(initialised=False))
        assert report.flush() == tmp_path / f"worker-{os.getpid()}.json"
        process("VllmWorker-0", _groups(dp=(1, 2), tp=(0, 1), ep=(1, 2)))
        renamed = report.flush()
        assert renamed == tmp_path / f"worker-dp1-tp0-ep1-{os.getpid()}.json"
        assert sorted(p.name for p in tmp_path.iterdir()) == [renamed.name]
        data = json.loads(renamed.read_text())
        assert {k: data[k] for k in ("label", "role", "process", "dp_rank", "tp_rank",
                                     "ep_rank", "node_rank")} == {
            "label": "worker-dp1-tp0-ep1", "role": "worker", "process": "VllmWorker-0",
            "dp_rank": 1, "tp_rank": 0, "ep_rank": 1, "node_rank": None}
        assert [r["label"] for r in report.read_reports(tmp_path)] == ["worker-dp1-tp0-ep1"]
    finally:
        report.configure(None)


def test_reports_sort_by_role_then_rank():
    reports = [{"role": r, "pid": p, **{f"{k}_rank": v for k, v in ranks_.items()}}
               for r, p, ranks_ in (
                   ("worker", 5, {"dp": 1, "tp": 0}), ("engine_core", 3, {"dp": 1}),
                   ("worker", 4, {"dp": 0, "tp": 1}), ("api_server", 1, {}),
                   ("worker", 6, {"dp": 0, "tp": 0}), ("engine_core", 2, {"dp": 0}))]
    assert [r["pid"] for r in sorted(reports, key=report.report_order)] == [1, 2, 3, 6, 4, 5]
