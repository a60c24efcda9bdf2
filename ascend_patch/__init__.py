"""ascend-patch: a configuration-driven runtime patcher for vLLM.

Importing this package imports nothing heavy; `ascend_patch.plugin.register` is vLLM's entry
point and does nothing unless ASCEND_PATCH_CONFIG is set.
"""

__version__ = "0.1.0"
