"""Spec and loader: the config schema, the catalog, and the machinery that applies patches."""
