"""Lab tooling: accuracy studies of `moe.capacity` on a trained model. Not the product path.

Nothing in `ascend_patch.plugin`, the loader or the implementations imports this package;
its hooks act only in the processes that the lab scripts (scripts/drop_accuracy.py,
scripts/explore_drop_rules.py) start themselves.
"""
