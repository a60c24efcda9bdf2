"""Which vLLM process this is: its role and its ranks, for the report and /metrics.

vLLM names its processes by what started them (`VllmWorker-0`, `EngineCore_DP1`), and those
names repeat: each DP rank's executor starts its own `VllmWorker-0`. An operator needs the
role and the ranks instead, so every process is named by `label()`:

    api_server           the OpenAI server (MainProcess of `vllm serve` or of
                         `python -m vllm.entrypoints.openai.api_server`)
    api_server1          one of several (--api-server-count: ApiServer_1)
    headless             MainProcess of `vllm serve --headless` (engines only)
    model_inspector      vLLM's model-registry subprocess (`python -m
                         vllm.model_executor.models.registry`): it inspects a model class
                         when vLLM's model-info cache has none, and exits
    main                 any other first process (an offline LLM script)
    dp_coordinator       VLLM_DP_Coordinator
    engine_core-dp1      EngineCore_DP1 (EngineCore without DP: engine_core)
    worker-dp1-tp0-ep1   VllmWorker-N, once its process groups exist
    worker               the same worker before that (ranks unknown)

A rank appears once known: DP and TP for every process with model-parallel groups, PP only
when PP > 1, EP when vLLM built an EP group (MoE models), the node (`node1-`) only when the
groups span several nodes. Ranks come from vLLM's parallel state in the process itself (the
workers, or an engine core or first process that runs the model in-process); the DP rank,
before or without such groups, from the name vLLM gave the engine core (for a worker: its
parent's). A process that never initialises distributed (the API server) is named by its
role alone.

vLLM's parallel state exists only after the worker's `init_device`, later than a worker's
first report: `current()` is read again at every report write and metrics export, and the
report is renamed once the ranks are known (report.py). Nothing here imports vLLM: a
module that is not loaded yet has no ranks to give.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
from dataclasses import asdict, dataclass

from ascend_patch.core.catalog import Interface
from ascend_patch.core.session import SESSION

_PS = "vllm.distributed.parallel_state"

# Everything read from vLLM below, checked in this process before the first read (a vLLM
# whose parallel state differs gives no ranks and says why in the report) and by
# tests/core/test_ranks.py on each line.
INTERFACES = (
    Interface(f"{_PS}:model_parallel_is_initialized", "()",
              "whether this process's groups exist yet"),
    Interface(f"{_PS}:get_dp_group", "()", "DP rank (rank_in_group, world_size)"),
    Interface(f"{_PS}:get_tp_group", "()", "TP rank"),
    Interface(f"{_PS}:get_pp_group", "()", "PP rank, shown when PP > 1"),
    Interface(f"{_PS}:get_ep_group", "()", "EP rank (asserts when the model built no EP group)"),
    Interface(f"{_PS}:get_world_group", "()", "global rank, for the node rank"),
    Interface(f"{_PS}:get_node_count", "()", "node count, for the node rank"),
    Interface(f"{_PS}:GroupCoordinator", None,
              "its rank_in_group, world_size and rank attributes"),
)

# vLLM's process names (multiprocessing.Process(name=...)), the same on 0.23 and 0.32:
# v1/engine/utils.py (EngineCore_DP{global dp rank} / EngineCore), v1/executor/
# multiproc_executor.py (VllmWorker-{local rank}), v1/utils.py (ApiServer_{i}),
# v1/engine/coordinator.py (VLLM_DP_Coordinator); 0.32's DP supervisor
# (entrypoints/launchers/dp_supervisor.py) also starts APIServer_DPRank_{dp rank}.
_NAMES = (
    (re.compile(r"VllmWorker-\d+"), "worker"),
    (re.compile(r"EngineCore(?:_DP(?P<dp>\d+))?"), "engine_core"),
    (re.compile(r"DPEngineCoreActor_DP(?P<dp>\d+)"), "engine_core"),
    (re.compile(r"ApiServer_(?P<index>\d+)"), "api_server"),
    (re.compile(r"APIServer_DPRank_(?P<dp>\d+)"), "api_server"),
    (re.compile(r"VLLM_DP_Coordinator"), "dp_coordinator"),
)
# How vLLM's OpenAI server is started as a first process (`__main__`'s module).
_SERVER_MODULES = frozenset({"vllm.entrypoints.openai.api_server", "vllm.entrypoints.api_server"})

# vLLM starts it to read a model class's facts without importing the model in the server
# (model_executor/models/registry.py, _run_in_subprocess; 0.23 and 0.32); it loads plugins.
_INSPECTOR_MODULES = frozenset({"vllm.model_executor.models.registry"})

ROLES = ("api_server", "headless", "main", "model_inspector", "dp_coordinator", "engine_core",
         "worker", "other")


@dataclass(frozen=True)
class Identity:
    role: str
    process: str  # vLLM's (multiprocessing) name of this process
    dp_rank: int | None = None
    tp_rank: int | None = None
    pp_rank: int | None = None
    ep_rank: int | None = None
    node_rank: int | None = None
    index: int | None = None  # which of several API servers
    # Why vLLM's parallel state could not be read here (None: it could, or is not loaded).
    problem: str | None = None

    @property
    def label(self) -> str:
        return label(self.role, dp=self.dp_rank, tp=self.tp_rank, pp=self.pp_rank,
                     ep=self.ep_rank, node=self.node_rank, index=self.index)

    def fields(self) -> dict[str, object]:
        """For the report: label first, then what it is made of."""
        data = {"label": self.label, **asdict(self)}
        if data["problem"] is None:
            del data["problem"]
        return data


def label(role: str, *, dp: int | None = None, tp: int | None = None, pp: int | None = None,
          ep: int | None = None, node: int | None = None, index: int | None = None) -> str:
    """`role[index][-node<n>][-dp<n>][-pp<n>][-tp<n>][-ep<n>]`, unknown parts left out.

    Safe in a file name and a Prometheus label value; "-" separates parts and roles use
    "_", so a label splits back unambiguously. Order: outermost grouping first.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    parts = [role if index is None else f"{role}{index}"]
    for prefix, value in (("node", node), ("dp", dp), ("pp", pp), ("tp", tp), ("ep", ep)):
        if value is not None:
            if value < 0:
                raise ValueError(f"{prefix} rank {value} is negative")
            parts.append(f"{prefix}{value}")
    return "-".join(parts)


def role_of(process: str, argv: list[str] | None = None, main_module: str | None = None,
            ) -> tuple[str, dict[str, int]]:
    """(role, ranks or index read from the name) of a process vLLM named `process`; the
    first process (MainProcess) by how it was started."""
    for pattern, role in _NAMES:
        match = pattern.fullmatch(process)
        if match:
            return role, {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if process != "MainProcess":
        return "other", {}
    argv = sys.argv if argv is None else argv
    if main_module is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        main_module = getattr(spec, "name", None)
    if main_module in _SERVER_MODULES:
        return "api_server", {}
    if main_module in _INSPECTOR_MODULES:
        return "model_inspector", {}
    # `vllm serve ...` (the console script, `python -m vllm.entrypoints.cli.main`, or a
    # wrapper that hands its arguments to vLLM's CLI): the subcommand comes first.
    if len(argv) > 1 and argv[1] == "serve":
        return ("headless" if "--headless" in argv else "api_server"), {}
    return "main", {}


def current() -> Identity:
    """This process's identity now (cheap: a few attribute reads)."""
    global _known
    process = multiprocessing.current_process().name
    role, named = role_of(process)
    ranks, problem = _parallel_ranks()
    if ranks:
        if _known is None or _known[0] != os.getpid():
            SESSION.on_revert("ranks.cache", forget)
        _known = (os.getpid(), dict(ranks))
    elif _known is not None and _known[0] == os.getpid():
        # vLLM tears its groups down at shutdown (destroy_model_parallel): the last report
        # keeps the name the process served under.
        ranks = dict(_known[1])
    engine_dp = named.get("dp")
    if engine_dp is None and role == "worker":
        engine_dp = _engine_dp_of_parent()
    if engine_dp is not None and ranks.get("dp_size", 1) == 1:
        # No groups yet, or a DP group of one: vLLM runs the DP ranks of a dense model as
        # independent engines (ParallelConfig.reconfigure_for_independent_dp_rank), and only
        # the engine's name still says which one it is.
        ranks["dp"] = engine_dp
    return Identity(role=role, process=process, dp_rank=ranks.get("dp"),
                    tp_rank=ranks.get("tp"), pp_rank=ranks.get("pp"), ep_rank=ranks.get("ep"),
                    node_rank=ranks.get("node"), index=named.get("index"), problem=problem)


def _engine_dp_of_parent() -> int | None:
    """The DP rank in the name of the engine core that started this worker (multiprocessing
    keeps the parent's name, under fork and spawn alike)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return None
    role, named = role_of(parent.name, [], "")
    return named.get("dp") if role == "engine_core" else None


# (pid, ranks) last read in this process.
_known: tuple[int, dict[str, int]] | None = None
# Per process: None until checked, then "" (the interfaces hold) or why they do not.
_checked: tuple[int, str] | None = None


def _interfaces_problem() -> str:
    global _checked
    if _checked is not None and _checked[0] == os.getpid():
        return _checked[1]
    from ascend_patch.core.targets import parse_target, render_signature, resolve

    problem = ""
    for interface in INTERFACES:
        try:
            resolved = resolve(parse_target(interface.target), import_module=False)
        except (LookupError, KeyError) as exc:
            problem = f"{interface.target} ({interface.why}): {exc}"
            break
        if interface.signature is not None:
            live = render_signature(resolved.function)
            if live != interface.signature:
                problem = (f"{interface.target} has signature {live}, not "
                           f"{interface.signature} ({interface.why})")
                break
    _checked = (os.getpid(), problem)
    SESSION.on_revert("ranks.cache", forget)
    return problem


def forget() -> None:
    """Drop the ranks and the interface check cached in this process: after a revert, a
    test or an A/B arm in the same process may run under other process groups."""
    global _known, _checked
    _known = _checked = None


def _parallel_ranks() -> tuple[dict[str, int], str | None]:
    state = sys.modules.get(_PS)
    if state is None:
        return {}, None
    problem = _interfaces_problem()
    if problem:
        return {}, f"ranks unknown: vLLM's parallel state differs: {problem}"
    try:
        if not state.model_parallel_is_initialized():
            return {}, None
        dp, tp, pp = state.get_dp_group(), state.get_tp_group(), state.get_pp_group()
        ranks = {"dp": dp.rank_in_group, "dp_size": dp.world_size, "tp": tp.rank_in_group}
        if pp.world_size > 1:
            ranks["pp"] = pp.rank_in_group
        try:
            ranks["ep"] = state.get_ep_group().rank_in_group
        except AssertionError:
            pass  # a model without experts: vLLM builds no EP group
        nodes = state.get_node_count()
        if nodes > 1:
            world = state.get_world_group()
            ranks["node"] = world.rank // max(world.world_size // nodes, 1)
    except AssertionError:
        return {}, None  # torn down (destroy_model_parallel at exit) or half built
    except Exception as exc:  # noqa: BLE001 - a name is never worth a failed write or forward
        return {}, f"ranks unknown: {type(exc).__name__}: {exc}"
    return ranks, None
