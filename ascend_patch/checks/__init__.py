"""Static checks of patch targets: upstream source trees read with `ast`, never imported.

`ascend-patch validate --source PACKAGE=DIR` (and what `plan` shows) use it; the runtime
does not. source_tree.py reads one module's bindings; static_targets.py follows a target
through imports, aliases and base classes to its definition.
"""
