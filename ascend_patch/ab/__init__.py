"""The A/B tool behind `ascend-patch ab`: arms (configs, drop ratios, stock vLLM) compared
through real vLLM engines (offline.py) or OpenAI-compatible servers (servers.py).

Dependencies flow one way: offline and servers both build on common (arms, reports,
agreement), stats (medians, intervals, run order) and output (tables, plots), and neither
imports the other. The command line (ascend_patch/cli/ab.py) parses and dispatches.
"""
