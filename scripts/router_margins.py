"""What the trained router's choices look like, and whether a row's weight predicts its size.

    python scripts/router_margins.py [--model tests/data/tiny-moe-stdlib] [--tokens 8192]

Runs the checkpoint in transformers (float32, no drops) over the held-out text and, per MoE
layer, reports: the mean sorted top-k weights; the router margins (logit gap between
consecutive choices, and between the k-th choice and the best expert left out); and for
every routed row the norm of what it adds to the token, ||w * E(x)||, against its weight w:
how well w alone ranks the rows by contribution (Spearman), and how much of the spread of
||E(x)|| is between experts (a fixed per-expert scale could then correct w) rather than
within one expert's tokens.

With --scales-out, also writes each layer's per-expert mean ||E(x)|| measured on TRAINING
text (never the held-out text the drop study scores): the calibration the lab rule
`key:scaled` (lab/rules.py) ranks rows with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ascend_patch.lab.arms import heldout_prompts, stdlib_heldout_text


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "tests/data/tiny-moe-stdlib")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "lab-out/router_margins.json")
    parser.add_argument("--scales-out", type=Path, default=None)
    args = parser.parse_args()

    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    k = model.config.num_experts_per_tok
    records: list[dict] = []

    def hook(block, inputs, _output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        logits = torch.nn.functional.linear(x, block.gate.weight)
        top, ids = logits.topk(k + 1, dim=-1)  # sorted: k chosen + the best left out
        weights = top[:, :k].softmax(dim=-1)
        experts = block.experts
        norms = torch.empty(x.shape[0], k)
        for slot in range(k):
            for e in ids[:, slot].unique().tolist():
                rows = ids[:, slot] == e
                gate, up = torch.nn.functional.linear(
                    x[rows], experts.gate_up_proj[e]).chunk(2, -1)
                y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up,
                                               experts.down_proj[e])
                norms[rows, slot] = y.norm(dim=-1)
        records.append({"logits": top.detach(), "ids": ids[:, :k].detach(),
                        "weights": weights.detach(), "norms": norms.detach()})

    blocks = [layer.mlp for layer in model.model.layers]
    for block in blocks:
        block.register_forward_hook(hook)
    layers = len(blocks)
    num_experts = model.config.num_local_experts
    if args.scales_out:
        train_text = stdlib_heldout_text(held_out=False)
        with torch.no_grad():
            for ids in heldout_prompts(args.model, args.prompts, args.length, train_text):
                model(input_ids=torch.tensor([ids]))
        scales = []
        for index in range(layers):
            parts = records[index::layers]
            ids = torch.cat([p["ids"] for p in parts]).reshape(-1)
            norms = torch.cat([p["norms"] for p in parts]).reshape(-1)
            total = torch.zeros(num_experts).index_add_(0, ids, norms)
            count = torch.bincount(ids, minlength=num_experts)
            # An expert the calibration never routed to gets the layer's mean.
            mean = torch.where(count > 0, total / count.clamp(min=1), norms.mean())
            scales.append([round(float(v), 4) for v in mean])
        args.scales_out.parent.mkdir(parents=True, exist_ok=True)
        args.scales_out.write_text(json.dumps(scales))
        records.clear()
    prompts = heldout_prompts(args.model, args.prompts, args.length)
    with torch.no_grad():
        for ids in prompts:
            model(input_ids=torch.tensor([ids]))
    report = {}
    for index in range(layers):
        parts = records[index::layers]
        logits = torch.cat([p["logits"] for p in parts])
        weights = torch.cat([p["weights"] for p in parts])
        ids = torch.cat([p["ids"] for p in parts])
        norms = torch.cat([p["norms"] for p in parts])
        contribution = weights * norms
        flat_ids, flat_norm = ids.reshape(-1), norms.reshape(-1)
        per_expert = torch.zeros(num_experts).index_add_(0, flat_ids, flat_norm) / (
            torch.bincount(flat_ids, minlength=num_experts).clamp(min=1))
        between = float(per_expert[flat_ids].var() / flat_norm.var())
        gaps = logits[:, :-1] - logits[:, 1:]
        report[f"layer{index}"] = {
            "mean_sorted_weights": [round(float(v), 4) for v in weights.mean(0)],
            "logit_gap_between_choices_median": [round(float(v), 3)
                                                 for v in gaps[:, :k - 1].median(0).values],
            "logit_gap_kth_to_left_out_median": round(float(gaps[:, k - 1].median()), 3),
            "kth_weight_quartiles": [round(float(q), 4) for q in torch.quantile(
                weights[:, -1], torch.tensor([0.25, 0.5, 0.75]))],
            "expert_output_norm_mean_by_rank": [round(float(v), 3) for v in norms.mean(0)],
            "contribution_mean_by_rank": [round(float(v), 4) for v in contribution.mean(0)],
            "spearman_weight_vs_contribution": round(spearman(weights.reshape(-1),
                                                              contribution.reshape(-1)), 4),
            "share_of_norm_variance_between_experts": round(between, 4),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
