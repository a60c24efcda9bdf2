"""Serve a tiny MoE model under a shipped config and answer real requests.

    python scripts/demo.py [--config configs/cpu-dp-ep.yaml] [--setting dp-ep|tp-ep|single]
                           [--enforce-eager]

Starts vLLM's OpenAI-compatible server (CPU build) with ASCEND_PATCH_CONFIG, sends completion
requests over HTTP, prints the answers and what every vLLM process reports about the patches
(applied where, rows dropped), then stops the server.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ascend_patch.core.report import read_reports, report_order
from ascend_patch.harness.procs import vllm_env
from ascend_patch.harness.server import ManagedServer, ServerError
from ascend_patch.harness.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parent.parent

SETTINGS = {
    "single": {"args": [], "workers": 1},
    "tp-ep": {"args": ["--tensor-parallel-size", "2", "--enable-expert-parallel"], "workers": 2},
    "dp-ep": {"args": ["--data-parallel-size", "2", "--enable-expert-parallel"], "workers": 2},
}

PROMPTS = [" ".join(f"w{(7 * i + j) % 500}" for j in range(300)) for i in range(4)]


def summarize(report_dir: Path) -> None:
    print("\nper-process report (ASCEND_PATCH_REPORT_DIR), by role and DP/TP/EP rank:")
    for report in sorted(read_reports(report_dir), key=report_order):
        parts = []
        for patch in report["patches"]:
            text = f"{patch['name']}={patch['status']}"
            stats = patch["stats"]
            if "rows_routed" in stats:
                text += f" (rows routed {stats['rows_routed']}, dropped {stats['rows_dropped']}"
                paths = sorted({p["path"] for p in stats.get("dispatch_paths", {}).values()})
                if paths:
                    text += f"; dispatch {'/'.join(paths)}"
                a2a = stats.get("all_to_all")
                if a2a:
                    text += (f"; all-to-all rows sent {a2a['rows_sent']} (to the other ranks "
                             f"{a2a['rows_sent_remote']}), received {a2a['rows_received']}, "
                             f"held back as dropped {a2a['rows_not_sent_dropped']}, "
                             f"bytes to other ranks {a2a['bytes_sent_remote']}")
                text += ")"
            elif any(key.endswith(".bytes") for key in stats):
                text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())) + ")"
            parts.append(text)
        profile = f" profile={report['profile']}" if report.get("profile") else ""
        print(f"  {report['label']:<20} pid {report['pid']:<7}{profile} {', '.join(parts) or '-'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu-dp-ep.yaml"))
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="dp-ep")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="skip vLLM's default torch.compile (starts about twice as fast)")
    args = parser.parse_args()
    setting = SETTINGS[args.setting]

    work = Path(tempfile.mkdtemp(prefix="ascend-patch-demo-"))
    model = make_tiny_model(work / "tiny-deepseek-v3", "deepseek_v3")
    # The CPU settings of the installed vLLM line (threads per worker, MLA off on 0.23, ...).
    env = vllm_env(workers=setting["workers"],
                   ASCEND_PATCH_CONFIG=str(Path(args.config).resolve()),
                   ASCEND_PATCH_REPORT_DIR=str(work / "reports"))
    print(f"config  {args.config}\nsetting {args.setting}: {' '.join(setting['args']) or '(one process)'}")
    print(f"model   {model} (tiny DeepseekV3, random weights)\nlog     {work / 'server.log'}")
    try:
        # vLLM's default (compiled) mode unless --enforce-eager: compiling takes minutes here.
        with ManagedServer(model, args=setting["args"], env=env, log_path=work / "server.log",
                           startup_timeout=900, enforce_eager=args.enforce_eager) as server:
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
