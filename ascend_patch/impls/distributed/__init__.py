"""`distributed.*` implementations: collectives vLLM's CPU communicator lacks, an uneven
all-to-all for the expert-parallel group, and a cross-rank config check.

Importing this package imports neither torch nor vLLM; `spec` is the catalog entry and the
other modules are imported only when a patch is applied or a helper is called.
"""
