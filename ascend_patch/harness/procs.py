"""Child processes that run vLLM: environment for the CPU build, bounded runs, group kill."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def vllm_env(*, workers: int = 1, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a vLLM CPU run: no inherited ascend-patch or vLLM settings."""
    from ascend_patch.core.versions import installed_vllm, line_of

    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if not k.startswith(("ASCEND_PATCH_", "VLLM_"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
    vllm = installed_vllm()
    line = line_of(vllm.version) if vllm else None
    if line is not None:
        # What the line's CPU build needs to run our tiny models (the registry says why).
        env.update(line.cpu_env)
    if workers > 1:
        # One OpenMP thread group per worker, none held back: what a 2-core machine can give.
        env.update(VLLM_CPU_OMP_THREADS_BIND="|".join(str(i) for i in range(workers)),
                   VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    env.update(extra)
    return env


def run_in_group(cmd: Sequence[str], env: Mapping[str, str], timeout: float,
                 cwd: str | Path | None = None) -> tuple[int, str]:
    """Run cmd in its own process group; on timeout kill the whole group (vLLM's children too)."""
    proc = subprocess.Popen(list(cmd), env=dict(env), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, out + f"\n[killed after {timeout:.0f} s]"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stray workers of a run that exited
        except ProcessLookupError:
            pass
    return proc.returncode, out
