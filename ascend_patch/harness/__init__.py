"""vLLM in child processes: the offline runner, a managed API server, the CPU build's
environment and process-group handling, tiny models for the dummy loader.

Used by `ascend-patch ab`, the lab studies, scripts and tests; the runtime never imports it.
"""
