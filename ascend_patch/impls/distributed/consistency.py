"""Cross-rank check that every rank of a group runs the same patch config.

A rank that patched differently (another config file, another drop ratio) would route or
drop MoE rows differently from its peers and silently corrupt results, or hang in a
collective whose sizes differ. Within one launch the first process pins the config digest
for its children; separate launches (multi-node data parallel: a head and `--headless`
nodes) read their own files and environments, so only this check, at the first MoE call,
can catch them. `check_same_config` all-gathers a fixed-size fingerprint (sha256 of the
config digest plus the canonical JSON of the MoE options) and, when the fingerprints
differ, gathers the readable values too and raises `ConfigMismatchError` on every rank,
naming what differs on which ranks. Every rank takes part in the same collectives in every
case, so a mismatch fails every rank instead of hanging one; and every wait is bounded, so a
rank that never arrives (it failed, or runs without the patch) fails its peers with
`ConfigCheckTimeout` instead of blocking them until the process group's own timeout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ascend_patch.core.session import SESSION

_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
log = logging.getLogger("ascend_patch")


# Ranks reach the first MoE call within the same forward (vLLM synchronises DP ranks before
# each step), but compiling the model first can take minutes on a loaded host.
CHECK_TIMEOUT_S = 600.0


class ConfigMismatchError(RuntimeError):
    """Ranks of one group run different patch configs."""

    def __init__(self, message: str, values_by_ranks: dict[tuple[int, ...], str]):
        super().__init__(message)
        self.values_by_ranks = values_by_ranks


class ConfigCheckTimeout(RuntimeError):
    """Not every rank of the group reached the config check in time."""


# How long a process whose check failed waits for vLLM to stop it before it exits itself.
EXIT_AFTER_FAILED_CHECK_S = 30.0


def exit_later(reason: str, delay_s: float = EXIT_AFTER_FAILED_CHECK_S) -> threading.Event:
    """Exit this process (code 1) in `delay_s` seconds unless `cancel_exits()` is called.

    A rank whose check failed raises, and vLLM reports the error; but when that happens while
    an engine starts (its first forward) with a data-parallel peer in another launch, vLLM
    0.32 leaves the engine core waiting on its workers (seen: the head's API server never
    became ready nor exited, while the headless node shut down). A process that may not
    serve must not outlive its error: after `delay_s` it exits, its engine notices the dead
    worker and shuts down. Returns the event that cancels it (a caller that handles the
    error itself, e.g. a test)."""
    cancelled = threading.Event()
    _pending_exits.append(cancelled)
    SESSION.on_revert("distributed.pending_exits", cancel_exits)  # the failed check is reverted too

    def stop() -> None:
        if cancelled.wait(delay_s):
            return
        log.error("ascend-patch [pid %d]: exiting: %s (vLLM did not stop this process within "
                  "%.0f s of the error)", os.getpid(), reason, delay_s)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=stop, name="ascend-patch-exit-after-check", daemon=True).start()
    return cancelled


_pending_exits: list[threading.Event] = []


def cancel_exits() -> None:
    """Cancel every pending `exit_later` of this process."""
    while _pending_exits:
        _pending_exits.pop().set()


def canonical(digest: str, moe_options: dict[str, Any] | None) -> str:
    return json.dumps(
        {"digest": digest, "moe_options": moe_options or {}},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )


def _group_and_device(group: Any) -> tuple[Any, torch.device]:
    # A vLLM GroupCoordinator: its gloo cpu_group works on every platform.
    cpu_group = getattr(group, "cpu_group", None)
    if cpu_group is not None:
        return cpu_group, torch.device("cpu")
    pg = dist.group.WORLD if group is None else group
    backend = str(dist.get_backend(pg)).lower()
    if "gloo" in backend or "mpi" in backend:
        return pg, torch.device("cpu")
    if "nccl" in backend:
        return pg, torch.device("cuda", torch.cuda.current_device())
    if "hccl" in backend:
        npu = getattr(torch, "npu")  # noqa: B009 - torch_npu registers torch.npu
        return pg, torch.device("npu", npu.current_device())
    return pg, torch.device("cpu")


class _Deadline:
    def __init__(self, pg: Any, timeout_s: float):
        self.pg, self.timeout_s = pg, timeout_s
        self.start = time.monotonic()
        self.end = self.start + timeout_s

    def all_gather_rows(self, x: torch.Tensor, ws: int) -> torch.Tensor:
        out = x.new_empty((ws,) + tuple(x.shape))
        work = _all_gather_tensor(out.view((ws * x.shape[0],) + tuple(x.shape[1:])), x,
                                  group=self.pg, async_op=True)
        left = max(self.end - time.monotonic(), 0.001)
        try:
            work.wait(timeout=timedelta(seconds=left))
        except RuntimeError as exc:  # gloo: "Operation timed out!", or a peer's exit
            me = dist.get_rank(self.pg)
            waited = time.monotonic() - self.start
            raise ConfigCheckTimeout(
                f"ascend_patch: rank {me} of a group of {ws} gave up after {waited:.0f} s "
                f"(at most {self.timeout_s:.0f}) at the first MoE call's config check: not "
                "every rank arrived; a rank failed before it, or runs without this patch "
                "(ASCEND_PATCH_CONFIG unset or the patch disabled there). Stopping instead of "
                f"hanging ({str(exc).strip()})"
            ) from None
        return out


def _gather_strings(text: str, deadline: _Deadline, ws: int, device: torch.device) -> list[str]:
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    lengths = [int(v) for v in deadline.all_gather_rows(length, ws).view(-1).tolist()]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    rows = deadline.all_gather_rows(padded, ws).cpu()
    return [bytes(rows[r, : lengths[r]].tolist()).decode(errors="replace") for r in range(ws)]


def describe_differences(texts: list[str]) -> list[str]:
    """One phrase per differing item of the canonical texts: the config files (digest) and
    each option, with its value on which ranks (values in first-rank order)."""

    def ranks_by(values: list[str]) -> str:
        groups: dict[str, list[int]] = {}
        for rank, value in enumerate(values):
            groups.setdefault(value, []).append(rank)
        return ", ".join(f"{value} on ranks {ranks}" for value, ranks in groups.items())

    parsed = [json.loads(t) for t in texts]
    phrases = []
    digests = [p["digest"][:12] or "(none)" for p in parsed]
    if len(set(digests)) > 1:
        phrases.append(f"the config files differ (sha256 {ranks_by(digests)})")
    keys = sorted({k for p in parsed for k in p["moe_options"]})
    for key in keys:
        values = [json.dumps(p["moe_options"].get(key), sort_keys=True) for p in parsed]
        if len(set(values)) > 1:
            phrases.append(f"option {key} is {ranks_by(values)}")
    return phrases


def check_same_config(digest: str, moe_options: dict[str, Any] | None, group: Any,
                      timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Raise `ConfigMismatchError` on every rank of `group` unless all ranks pass equal
    `digest` and `moe_options`; `ConfigCheckTimeout` when not every rank arrives within
    `timeout_s`. `group`: a vLLM GroupCoordinator (its cpu_group is used), a torch
    ProcessGroup, or None for the default group. Collective: every rank must call it.
    """
    pg, device = _group_and_device(group)
    ws = dist.get_world_size(pg)
    if ws == 1:
        return
    deadline = _Deadline(pg, timeout_s)
    text = canonical(digest, moe_options)
    fingerprint = torch.tensor(
        list(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8, device=device
    )
    gathered = deadline.all_gather_rows(fingerprint, ws).cpu()
    if bool((gathered == gathered[0]).all()):
        return
    # Every rank saw the same gathered fingerprints, so every rank is here: one more
    # collective to make the message readable.
    texts = _gather_strings(text, deadline, ws, device)
    by_value: dict[str, list[int]] = {}
    for r, t in enumerate(texts):
        by_value.setdefault(t, []).append(r)
    ordered = sorted(by_value.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
    me = dist.get_rank(pg)
    message = (
        f"ascend_patch config differs across the {ws} ranks of this group "
        f"(this is rank {me} of the group): " + "; ".join(describe_differences(texts))
        + ". Every rank stops here rather than serve with mixed configs: start every "
        "launch with the same config file, ASCEND_PATCH_OVERRIDE and ASCEND_PATCH_DISABLE"
    )
    raise ConfigMismatchError(message, {tuple(r): v for v, r in ordered})
