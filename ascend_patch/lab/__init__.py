"""Lab tooling: accuracy studies of `moe.capacity` on a trained model, and the MoE layer study
(layer.py: `ascend-patch ab --layer` and the layer benchmarks). Not the product path.

Nothing in `ascend_patch.plugin`, the loader, the implementations, the checks, the harness or
the A/B tool imports this package; the command line imports layer.py only when `ab --layer`
runs. Its hooks act only in the processes that the lab scripts (scripts/drop_accuracy.py,
scripts/explore_drop_rules.py) start themselves.
"""
