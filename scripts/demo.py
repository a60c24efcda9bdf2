"""Serve a tiny MoE model under a shipped config and answer real requests.

    python scripts/demo.py [--config configs/cpu-dp-ep.yaml] [--setting dp-ep|tp-ep|single]

Starts vLLM's OpenAI-compatible server (CPU build) with ASCEND_PATCH_CONFIG, sends completion
requests over HTTP, prints the answers and what every vLLM process reports about the patches
(applied where, rows dropped), then stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from make_tiny_model import make_tiny_model  # noqa: E402

from ascend_patch.cli.server import ManagedServer, ServerError  # noqa: E402
from ascend_patch.core.report import read_reports  # noqa: E402

SETTINGS = {
    "single": {"args": [], "workers": 1},
    "tp-ep": {"args": ["--tensor-parallel-size", "2", "--enable-expert-parallel"], "workers": 2},
    "dp-ep": {"args": ["--data-parallel-size", "2", "--enable-expert-parallel"], "workers": 2},
}

PROMPTS = [" ".join(f"w{(7 * i + j) % 500}" for j in range(300)) for i in range(4)]


def summarize(report_dir: Path) -> None:
    print("\nper-process report (ASCEND_PATCH_REPORT_DIR):")
    for report in sorted(read_reports(report_dir), key=lambda r: r["role"]):
        parts = []
        for patch in report["patches"]:
            text = f"{patch['name']}={patch['status']}"
            totals = patch["stats"].get("totals") if isinstance(patch["stats"], dict) else None
            if totals:
                text += f" (rows routed {totals.get('rows_routed')}, dropped {totals.get('rows_dropped')})"
            parts.append(text)
        profile = f" profile={report['profile']}" if report.get("profile") else ""
        print(f"  {report['role']:<16} pid {report['pid']:<7}{profile} {', '.join(parts) or '-'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu-dp-ep.yaml"))
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="dp-ep")
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args()
    setting = SETTINGS[args.setting]

    work = Path(tempfile.mkdtemp(prefix="ascend-patch-demo-"))
    model = make_tiny_model(work / "tiny-deepseek-v3", "deepseek_v3")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_PATCH_")}
    env.update(ASCEND_PATCH_CONFIG=str(Path(args.config).resolve()),
               ASCEND_PATCH_REPORT_DIR=str(work / "reports"), VLLM_CPU_KVCACHE_SPACE="1")
    if setting["workers"] > 1:
        env.update(VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    print(f"config  {args.config}\nsetting {args.setting}: {' '.join(setting['args']) or '(one process)'}")
    print(f"model   {model} (tiny DeepseekV3, random weights)\nlog     {work / 'server.log'}")
    try:
        with ManagedServer(model, args=setting["args"], env=env, log_path=work / "server.log") as server:
            print(f"server  ready at {server.base_url}")
            # Concurrent requests, so that every DP rank has work.
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                answers = list(pool.map(lambda p: server.complete(p, max_tokens=args.max_tokens), PROMPTS))
            for prompt, answer in zip(PROMPTS, answers):
                choice = answer["choices"][0]
                print(f"\nPOST /v1/completions  prompt: {prompt[:40]}... ({len(prompt.split())} words)")
                print(f"  -> {choice['text'].strip()!r}  [{answer['usage']['completion_tokens']} tokens, "
                      f"finish {choice['finish_reason']}]")
    except ServerError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    summarize(work / "reports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
