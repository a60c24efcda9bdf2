"""The engine benchmark's constructed router (lab/skewed_moe.py) produces the skew it was
calibrated for, and its weights carry that router into the model."""

from __future__ import annotations

import pytest
import torch

from ascend_patch.lab import skewed_moe
from ascend_patch.lab.skewed_moe import (
    ModelShape,
    calibrate_gate,
    equivalent_skew,
    model_weights,
    rank_max_over_mean,
    synthetic_hidden,
)

SHAPE = ModelShape()


def test_r1_carried_to_ep2():
    # R1: hottest rank 2.5x the mean at EP32, so 2.5 * 31 / 29.5 x the other ranks' mean.
    hot_over_rest = 2.5 * 31 / 29.5
    assert equivalent_skew(2.5, 32, 2) == pytest.approx(2 * hot_over_rest / (hot_over_rest + 1))
    assert equivalent_skew(2.5, 32, 2) == pytest.approx(1.4486, abs=1e-4)
    assert equivalent_skew(2.5, 32, 32) == pytest.approx(2.5)
    assert equivalent_skew(1.0, 32, 2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        equivalent_skew(32.0, 32, 2)


@pytest.mark.parametrize("target", [1.2, equivalent_skew(2.5, 32, 2), 1.8])
def test_gate_meets_target_on_the_calibration_input(target):
    gate = calibrate_gate(SHAPE, target, ep_size=2, seed=0, tolerance=0.02)
    assert abs(gate.achieved - target) <= 0.02
    assert gate.scale > 0
    # The same fixed input, routed again from the returned weight: the same max/mean.
    states = synthetic_hidden(4096, SHAPE.hidden, seed=0)
    assert rank_max_over_mean(states, gate.weight, SHAPE.top_k, 2) == gate.achieved


def test_skew_holds_on_other_tokens():
    """Not fitted to the calibration sample: fresh tokens land within 0.05 of the target."""
    target = equivalent_skew(2.5, 32, 2)
    gate = calibrate_gate(SHAPE, target, ep_size=2, seed=0)
    fresh = synthetic_hidden(8192, SHAPE.hidden, seed=123)
    assert abs(rank_max_over_mean(fresh, gate.weight, SHAPE.top_k, 2) - target) <= 0.05


def test_unskewed_and_unreachable_targets():
    balanced = calibrate_gate(SHAPE, 1.0, ep_size=2)
    assert balanced.scale == 0.0 and balanced.achieved < 1.1
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_gate(SHAPE, 2.5, ep_size=2)  # two ranks: at most 2.0
    with pytest.raises(ValueError, match="do not split"):
        calibrate_gate(SHAPE, 1.4, ep_size=3)


def test_weights_keep_the_constant_channel_and_the_gate():
    shape = ModelShape(hidden=64, intermediate=64, experts=4, layers=2, vocab=32)
    gate = calibrate_gate(shape, 1.3, ep_size=2)
    weights = model_weights(shape, gate, seed=0)
    assert torch.all(weights["model.embed_tokens.weight"][:, 0] == skewed_moe.CONSTANT)
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        assert torch.equal(weights[p + "block_sparse_moe.gate.weight"],
                           gate.weight.to(torch.bfloat16))
        assert torch.all(weights[p + "self_attn.o_proj.weight"][0] == 0)
        for e in range(shape.experts):
            assert torch.all(weights[f"{p}block_sparse_moe.experts.{e}.w2.weight"][0] == 0)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert weights["model.layers.1.block_sparse_moe.experts.3.w1.weight"].shape == (64, 64)
