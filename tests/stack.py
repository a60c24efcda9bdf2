"""The vLLM stack the suite runs on (each line has its own environment; see scripts/test.sh)."""

from ascend_patch.core.stacks import PRIMARY
from ascend_patch.core.versions import LINE_NAMES, detect_stack

STACK = detect_stack()
LINE = STACK.line
# A supported line that is not the installed one: configs pinned to it must be refused here.
OTHER_LINE = next(name for name in LINE_NAMES if name != LINE)
OTHER_RANGE = f">={OTHER_LINE},<{OTHER_LINE.split('.')[0]}.{int(OTHER_LINE.split('.')[1]) + 1}"
# The primary stack's environment: the unit and e2e tiers and the `once` tests run here only.
IS_PRIMARY = LINE == PRIMARY.line
# World sizes of the multi-rank contract tests: 4 ranks on the primary line only (the other
# lines' environments check the same code against their vLLM with 2; CI time).
WORLD_SIZES = [2, 4] if IS_PRIMARY else [2]
