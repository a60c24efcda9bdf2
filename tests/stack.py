"""The vLLM stack the suite runs on (each line has its own environment; see scripts/test.sh)."""

from ascend_patch.core.versions import LINE_NAMES, detect_stack

STACK = detect_stack()
LINE = STACK.line
# A supported line that is not the installed one: configs pinned to it must be refused here.
OTHER_LINE = next(name for name in LINE_NAMES if name != LINE)
OTHER_RANGE = f">={OTHER_LINE},<{OTHER_LINE.split('.')[0]}.{int(OTHER_LINE.split('.')[1]) + 1}"
