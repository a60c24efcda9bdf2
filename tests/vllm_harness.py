"""Running the real vLLM (CPU build) in a child process, bounded in time, cleaned up always."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ascend_patch.harness import offline_run
from ascend_patch.harness.procs import run_in_group, vllm_env

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    returncode: int
    log: str
    result: dict[str, Any] | None

    def tokens(self) -> list[list[int]]:
        assert self.result is not None, self.log[-6000:]
        return [o["token_ids"] for o in self.result["outputs"]]


def run_offline(
    model: Path,
    prompts: list[str],
    tmp_path: Path,
    *,
    config: Path | None = None,
    report_dir: Path | None = None,
    max_tokens: int = 8,
    logprobs: int = 0,
    tensor_parallel: int = 1,
    expert_parallel: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    extra: tuple[str, ...] = (),
) -> Run:
    prompts_file = tmp_path / f"prompts-{len(list(tmp_path.glob('prompts-*')))}.json"
    prompts_file.write_text(json.dumps(prompts))
    cmd = offline_run.command(model, prompts_file, max_tokens=max_tokens, logprobs=logprobs,
                              tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
                              extra=extra)
    extra = dict(env or {})
    if config is not None:
        extra["ASCEND_PATCH_CONFIG"] = str(config)
    if report_dir is not None:
        extra["ASCEND_PATCH_REPORT_DIR"] = str(report_dir)
    code, log = run_in_group(cmd, vllm_env(workers=tensor_parallel, **extra), timeout, cwd=REPO)
    return Run(code, log, offline_run.parse_result(log))


def reports_by_role(report_dir: Path) -> dict[str, dict[str, Any]]:
    """Reports keyed by vLLM's process name (MainProcess, EngineCore, VllmWorker-0): unique
    in the one-engine runs that use this, once vLLM's model-inspection subprocess (also a
    MainProcess; only when its model-info cache is cold) is left out."""
    from ascend_patch.core.report import read_reports

    return {r["process"]: r for r in read_reports(report_dir) if r["role"] != "model_inspector"}


def patch_in(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in report["patches"] if p["name"] == name)
