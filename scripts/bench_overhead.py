"""Issue item 4: what the patcher costs.

    .venvs/vllm-0.32/bin/python scripts/bench_overhead.py [--runs 3] [--loader-runs 7]

1. vLLM offline start-up (`LLM(...)` construction, tiny DeepseekV3 from
   `ascend_patch.harness.tiny_model`, dummy weights) without and with ASCEND_PATCH_CONFIG, runs
   alternated, medians; each run is `ascend_patch.harness.offline_run` in its own process group
   (`ascend_patch.harness.procs.run_in_group`). The config applies moe.capacity at r = 0 and the
   two ops patches.
2. The loader's own cost per process: a fresh interpreter imports vllm.engine.arg_utils (where
   vLLM first calls load_general_plugins, so vLLM's config and pydantic are loaded), then times
   `ascend_patch.plugin.register()` with the config set (what vLLM runs in every process)
   and with it unset; plus `python -X importtime` of the plugin module with it unset and
   the list of ascend_patch modules that unset registration leaves imported.
3. Per-call overhead of a patched function against the original: vLLM's
   `RMSNorm.forward_native` patched by `ops.rms_norm` through the real loader, on its
   fall-back branch (the replacement checks and then calls the original: the difference is
   the wrapper's whole cost), and on its compute branch (our kernel instead of vLLM's code).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIG = """\
version: 1
vllm: ">=0.32,<0.33"
patches:
  - name: capacity
    impl: moe.capacity
    options: {drop_token_ratio: 0.0}
  - name: rms
    impl: ops.rms_norm
  - name: swiglu
    impl: ops.silu_and_mul
"""

OPS_CONFIG = """\
version: 1
vllm: ">=0.32,<0.33"
patches:
  - name: rms
    impl: ops.rms_norm
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND_PATCH_", "VLLM_"))}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


def startup(runs: int, work: Path, timeout: float = 300.0) -> dict:
    from ascend_patch.harness import offline_run
    from ascend_patch.harness.procs import run_in_group, vllm_env
    from ascend_patch.harness.tiny_model import make_tiny_model

    model = make_tiny_model(work / "tiny-deepseek-v3")
    config = work / "overhead.yaml"
    config.write_text(CONFIG)
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps(["w1 w2 w3 w4 w5 w6 w7 w8"]))
    cmd = offline_run.command(model, prompts, max_tokens=2)
    samples: dict[str, dict[str, list[float]]] = {
        arm: {"startup_s": [], "process_s": []} for arm in ("unset", "config")}
    for i in range(runs):
        for arm in ("unset", "config") if i % 2 == 0 else ("config", "unset"):
            extra = {"ASCEND_PATCH_CONFIG": str(config)} if arm == "config" else {}
            t0 = time.perf_counter()
            code, log = run_in_group(cmd, vllm_env(**extra), timeout, cwd=REPO)
            wall = time.perf_counter() - t0
            result = offline_run.parse_result(log)
            if code != 0 or result is None:
                raise RuntimeError(f"offline run ({arm}) failed, exit {code}:\n{log[-3000:]}")
            samples[arm]["startup_s"].append(result["startup_s"])
            samples[arm]["process_s"].append(wall)
    med = {arm: {k: statistics.median(v) for k, v in s.items()} for arm, s in samples.items()}
    return {
        "runs_per_arm": runs, "samples": samples, "median": med,
        "startup_ratio": med["config"]["startup_s"] / med["unset"]["startup_s"],
        "startup_diff_ms": 1e3 * (med["config"]["startup_s"] - med["unset"]["startup_s"]),
        "process_ratio": med["config"]["process_s"] / med["unset"]["process_s"],
        "process_diff_ms": 1e3 * (med["config"]["process_s"] - med["unset"]["process_s"]),
        "config": CONFIG,
    }


_LOADER_PROBE = r"""
import json, os, sys, time
# vLLM calls load_general_plugins() from engine/arg_utils.py, the engine core and the workers:
# by then its config modules (and pydantic) are imported.
import vllm.engine.arg_utils
t0 = time.perf_counter()
from ascend_patch.plugin import register
t1 = time.perf_counter()
register()
t2 = time.perf_counter()
mods = sorted(m for m in sys.modules if m.startswith("ascend_patch"))
print("PROBE " + json.dumps({"register_s": t2 - t0, "call_s": t2 - t1, "modules": mods}))
"""


def unset_modules() -> list[str]:
    """The ascend_patch modules a fresh interpreter holds after register() with the variable unset."""
    code = ("import sys, ascend_patch.plugin as p; p.register(); "
            "print(sorted(m for m in sys.modules if m.startswith('ascend_patch')))")
    proc = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True,
                          text=True, timeout=60, cwd=REPO, check=True)
    return eval(proc.stdout.strip().splitlines()[-1])


def loader(runs: int, work: Path) -> dict:
    config = work / "overhead.yaml"
    config.write_text(CONFIG)
    out: dict[str, list] = {"unset": [], "config": []}
    calls: dict[str, list] = {"unset": [], "config": []}
    modules = {}
    for i in range(runs):
        for arm in ("unset", "config"):
            extra = {"ASCEND_PATCH_CONFIG": str(config)} if arm == "config" else {}
            proc = subprocess.run([sys.executable, "-c", _LOADER_PROBE], env=_clean_env(**extra),
                                  capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
            line = [l for l in proc.stdout.splitlines() if l.startswith("PROBE ")]
            if proc.returncode or not line:
                raise RuntimeError(f"loader probe ({arm}) failed:\n{proc.stderr[-3000:]}")
            probe = json.loads(line[0][6:])
            out[arm].append(probe["register_s"])
            calls[arm].append(probe["call_s"])
            modules[arm] = probe["modules"]
    # import time of the plugin module alone, variable unset
    imports = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c",
                               "import ascend_patch.plugin as p; p.register()"],
                              env=_clean_env(), capture_output=True, text=True, timeout=60, cwd=REPO,
                              check=False)
        cumulative = 0
        for line in proc.stderr.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) == 3 and parts[2].lstrip() in ("ascend_patch", "ascend_patch.plugin"):
                cumulative = max(cumulative, int(parts[1]))
        imports.append(cumulative / 1e6)
    return {
        "runs": runs,
        "register_unset_s_median": statistics.median(out["unset"]),
        "register_config_s_median": statistics.median(out["config"]),
        "register_config_s_samples": out["config"],
        "register_call_only_unset_s_median": statistics.median(calls["unset"]),
        "plugin_import_unset_s_median": statistics.median(imports),
        "modules_after_unset_register": modules["unset"],
        "modules_after_config_register": len(modules["config"]),
    }


_PER_CALL_PROBE = r"""
import json, os, statistics, time, torch
torch.set_num_threads(1)
from ascend_patch.core.runtime import apply_from_env
apply_from_env()
from types import SimpleNamespace
from vllm.model_executor.layers.layernorm import RMSNorm
patched = RMSNorm.forward_native
original = patched.__wrapped__
assert original is not patched
def timeit(fn, layer, x, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn(layer, x)
    return (time.perf_counter() - t0) / n
result = {}
for case, hidden, rows, override in (("fallback (wrapper only)", 64, 1, 32),
                                     ("compute small", 64, 1, None),
                                     ("compute [16, 4096] bf16", 4096, 16, None)):
    # The attributes forward_native reads (RMSNorm's CustomOp constructor needs a vLLM
    # config context, which this probe does not build).
    dtype = torch.bfloat16 if hidden == 4096 else torch.float32
    layer = SimpleNamespace(weight=torch.nn.Parameter(torch.ones(hidden, dtype=dtype)),
                            pass_weight=True, pass_weight_add=True, variance_epsilon=1e-6,
                            variance_size_override=override)
    x = torch.randn(rows, hidden, dtype=dtype)
    n = 2000 if hidden == 64 else 200
    a, b = [], []
    for _ in range(15):
        a.append(timeit(original, layer, x, n))
        b.append(timeit(patched, layer, x, n))
    result[case] = {"original_us": 1e6 * statistics.median(a), "patched_us": 1e6 * statistics.median(b),
                    "overhead_us": 1e6 * (statistics.median(b) - statistics.median(a))}
print("PROBE " + json.dumps(result))
"""


def per_call(work: Path) -> dict:
    config = work / "ops.yaml"
    config.write_text(OPS_CONFIG)
    proc = subprocess.run([sys.executable, "-c", _PER_CALL_PROBE],
                          env=_clean_env(ASCEND_PATCH_CONFIG=str(config)), capture_output=True,
                          text=True, timeout=300, cwd=REPO, check=False)
    line = [l for l in proc.stdout.splitlines() if l.startswith("PROBE ")]
    if proc.returncode or not line:
        raise RuntimeError(f"per-call probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][6:])


def bench(runs: int = 3, loader_runs: int = 7, skip_startup: bool = False) -> dict:
    from ascend_patch.lab.layer import machine_info

    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        work = Path(tmp)
        result = {"loader": loader(loader_runs, work), "per_call": per_call(work)}
        if not skip_startup:
            result["startup"] = startup(runs, work)
    per_process = result["loader"]["register_config_s_median"]
    result["targets"] = {
        "loader_lt_100ms_per_process": {"met": per_process < 0.1, "value_ms": 1e3 * per_process},
        "zero_cost_unset": {
            "met": result["loader"]["modules_after_unset_register"] == ["ascend_patch", "ascend_patch.plugin"],
            "register_unset_us": 1e6 * result["loader"]["register_unset_s_median"],
            "plugin_import_unset_ms": 1e3 * result["loader"]["plugin_import_unset_s_median"]},
    }
    if "startup" in result:
        st = result["startup"]
        spread_ms = 1e3 * max(max(v) - min(v) for v in
                              (st["samples"][arm]["startup_s"] for arm in ("unset", "config")))
        # A difference inside the run-to-run spread is not a measurement of the loader.
        resolvable = abs(st["startup_diff_ms"]) > spread_ms
        result["targets"]["startup_diff_lt_100ms"] = {
            "met": (st["startup_diff_ms"] < 100) if resolvable else None,
            "value_ms": st["startup_diff_ms"], "run_to_run_spread_ms": spread_ms,
            "note": None if resolvable else
            "inconclusive: the start-up difference is inside the run-to-run spread; the "
            "per-process loader cost (loader_lt_100ms_per_process) is the resolvable figure"}
    result["machine"] = machine_info()
    return result


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=200)
    if "startup" in result:
        s = result["startup"]
        t = Table(title=f"vLLM offline start-up, tiny DeepseekV3, {s['runs_per_arm']} runs per arm (medians); "
                        f"load {result['machine']['load_average']}")
        for col in ("arm", "LLM() start-up s", "whole process s"):
            t.add_column(col, justify="right")
        for arm in ("unset", "config"):
            t.add_row(f"ASCEND_PATCH_CONFIG {arm}", f"{s['median'][arm]['startup_s']:.2f}",
                      f"{s['median'][arm]['process_s']:.2f}")
        t.add_row("config / unset", f"{s['startup_ratio']:.3f} ({s['startup_diff_ms']:+.0f} ms)",
                  f"{s['process_ratio']:.3f} ({s['process_diff_ms']:+.0f} ms)")
        console.print(t)
    lo = result["loader"]
    t = Table(title=f"loader cost per process ({lo['runs']} fresh interpreters each, medians)")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("import plugin + register(), config with 3 patches",
              f"{1e3 * lo['register_config_s_median']:.1f} ms")
    t.add_row("import plugin + register(), ASCEND_PATCH_CONFIG unset",
              f"{1e6 * lo['register_unset_s_median']:.1f} us")
    t.add_row("register() call alone, unset", f"{1e6 * lo['register_call_only_unset_s_median']:.2f} us")
    t.add_row("import ascend_patch.plugin, unset (-X importtime, cumulative)",
              f"{1e3 * lo['plugin_import_unset_s_median']:.2f} ms")
    t.add_row("ascend_patch modules imported when unset", ", ".join(lo["modules_after_unset_register"]))
    console.print(t)
    t = Table(title="per call: RMSNorm.forward_native patched by ops.rms_norm vs the original (1 thread)")
    for col in ("case", "original us", "patched us", "difference us"):
        t.add_column(col, justify="right")
    for case, v in result["per_call"].items():
        t.add_row(case, f"{v['original_us']:.2f}", f"{v['patched_us']:.2f}", f"{v['overhead_us']:+.2f}")
    console.print(t)
    for name, v in result["targets"].items():
        verdict = {True: "met", False: "NOT met", None: "inconclusive"}[v["met"]]
        console.print(f"target {name}: {verdict} {v}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="vLLM start-ups per arm")
    p.add_argument("--loader-runs", type=int, default=7)
    p.add_argument("--skip-startup", action="store_true")
    p.add_argument("--out", default="bench-results")
    a = p.parse_args(argv)
    from ascend_patch.lab.layer import save_result

    result = bench(a.runs, a.loader_runs, a.skip_startup)
    print_tables(result)
    save_result(result, a.out, "overhead.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
