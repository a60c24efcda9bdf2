"""A CPU stand-in for the NPU side of vllm-ascend 0.23.0.post1 (test only).

Nothing here is imported by the test session itself: `boot.py` and `contract_worker.py` run
in subprocesses (they install a fake `torch_npu` and change torch process-wide), and
`harness.py` in tests/ascend starts them.
"""
