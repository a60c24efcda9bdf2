"""Device ops: torch_npu kernels on Ascend, portable PyTorch elsewhere."""
