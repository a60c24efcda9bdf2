"""Which rows each policy dropped, from the probe of a drop_accuracy.py run (--probe).

    python scripts/analyze_drops.py [--dir lab-out/drop-accuracy/sweep] [--arms a,b,...]

For every arm's prefill calls (one per MoE layer): the routing weight of the dropped rows
(mean, quartiles, share of all routed weight), their rank inside their token (1 = the
token's heaviest row), how many tokens lost rows and how much of their weight, and how the
router's top-k slot order relates to weight order (the position policy follows slots).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def describe(calls: list[dict[str, torch.Tensor]]) -> dict:
    weights = torch.cat([c["weights"] for c in calls])  # [T_all, k]
    keep = torch.cat([c["keep"] for c in calls])
    k = weights.shape[1]
    dropped = ~keep
    # Rank of each row inside its token: 0 = heaviest (ties by slot).
    order = torch.argsort(weights, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(k).expand_as(order).clone())
    dw = weights[dropped]
    lost = (weights * dropped).sum(dim=1)
    per_token_drops = dropped.sum(dim=1)
    affected = per_token_drops > 0
    quartiles = (torch.quantile(dw, torch.tensor([0.25, 0.5, 0.75])).tolist()
                 if dw.numel() else [0, 0, 0])
    return {
        "rows": int(weights.numel()),
        "dropped": int(dropped.sum()),
        "dropped_weight_mean": float(dw.mean()) if dw.numel() else 0.0,
        "dropped_weight_quartiles": [round(q, 4) for q in quartiles],
        "dropped_weight_share": float(dw.sum() / weights.sum()),
        "dropped_by_rank_in_token": [int((dropped & (rank == r)).sum()) for r in range(k)],
        "dropped_by_slot": [int(dropped[:, s].sum()) for s in range(k)],
        "tokens_losing_rows": [int((per_token_drops == n).sum()) for n in range(1, k + 1)],
        "lost_weight_per_affected_token": float(lost[affected].mean()) if affected.any() else 0,
        "lost_weight_sq_sum": float((lost ** 2).sum()),
        "slot0_is_heaviest": float((order[:, 0] == 0).float().mean()),
        "slots_in_weight_order": float((order == torch.arange(k)).all(dim=1).float().mean()),
        "mean_sorted_weights": [round(float(v), 4)
                                for v in weights.sort(dim=1, descending=True).values.mean(0)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=REPO / "lab-out/drop-accuracy/sweep")
    parser.add_argument("--arms", default="")
    parser.add_argument("--min-rows", type=int, default=256)
    args = parser.parse_args()
    wanted = set(filter(None, args.arms.split(",")))
    out = {}
    for path in sorted(args.dir.glob("plans-*.pt")):
        name = path.stem.removeprefix("plans-")
        if wanted and name not in wanted:
            continue
        calls = [c for c in torch.load(path) if c["weights"].numel() >= args.min_rows]
        if calls:
            out[name] = describe(calls)
    for name, d in out.items():
        print(name, json.dumps(d))
    (args.dir / "drops_analysis.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
