"""Cross-rank check that every rank of a group runs the same patch config.

A rank that patched differently (another config file, another drop ratio) would route or
drop MoE rows differently from its peers and silently corrupt results, or hang in a
collective whose sizes differ. `check_same_config` all-gathers a fixed-size fingerprint
(sha256 of the config digest plus the canonical JSON of the MoE options) and, when the
fingerprints differ, gathers the readable values too and raises `ConfigMismatchError` on
every rank, naming which ranks hold which value. Every rank takes part in the same
collectives in every case, so a mismatch fails every rank instead of hanging one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist

_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ConfigMismatchError(RuntimeError):
    """Ranks of one group run different patch configs."""

    def __init__(self, message: str, values_by_ranks: dict[tuple[int, ...], str]):
        super().__init__(message)
        self.values_by_ranks = values_by_ranks


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


def _all_gather_rows(x: torch.Tensor, pg: Any, ws: int) -> torch.Tensor:
    out = x.new_empty((ws,) + tuple(x.shape))
    _all_gather_tensor(out.view((ws * x.shape[0],) + tuple(x.shape[1:])), x, group=pg)
    return out


def _gather_strings(text: str, pg: Any, ws: int, device: torch.device) -> list[str]:
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    lengths = [int(v) for v in _all_gather_rows(length, pg, ws).view(-1).tolist()]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    rows = _all_gather_rows(padded, pg, ws).cpu()
    return [bytes(rows[r, : lengths[r]].tolist()).decode(errors="replace") for r in range(ws)]


def check_same_config(digest: str, moe_options: dict[str, Any] | None, group: Any) -> None:
    """Raise `ConfigMismatchError` on every rank of `group` unless all ranks pass equal
    `digest` and `moe_options`. `group`: a vLLM GroupCoordinator (its cpu_group is used), a
    torch ProcessGroup, or None for the default group. Collective: every rank must call it.
    """
    pg, device = _group_and_device(group)
    ws = dist.get_world_size(pg)
    if ws == 1:
        return
    text = canonical(digest, moe_options)
    fingerprint = torch.tensor(
        list(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8, device=device
    )
    gathered = _all_gather_rows(fingerprint, pg, ws).cpu()
    if bool((gathered == gathered[0]).all()):
        return
    # Every rank saw the same gathered fingerprints, so every rank is here: one more
    # collective to make the message readable.
    texts = _gather_strings(text, pg, ws, device)
    by_value: dict[str, list[int]] = {}
    for r, t in enumerate(texts):
        by_value.setdefault(t, []).append(r)
    ordered = sorted(by_value.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
    me = dist.get_rank(pg)
    lines = [f"ranks {ranks} have {value}" for value, ranks in ordered]
    message = (
        f"ascend_patch config differs across the {ws} ranks of this group "
        f"(this is rank {me} of the group): " + "; ".join(lines)
    )
    raise ConfigMismatchError(message, {tuple(r): v for v, r in ordered})
