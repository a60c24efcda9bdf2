"""Tests of `ascend_patch.impls.distributed` (real gloo process groups)."""
