"""scripts/gpu_check.py on the CPU: its refusal without a GPU and its --cpu-dry-run code
paths (the figures it prints on a GPU cannot be produced here: no GPU was lent)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.planner.capacity import plan_drops
from ascend_patch.lab.routing_sim import deepseek_routing
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _installed_kernel_file() -> Path | None:
    spec = importlib.util.find_spec("vllm")  # locates the package without importing it
    if spec is None or importlib.util.find_spec("triton") is None:
        return None
    path = Path(spec.origin).parent / "model_executor/layers/fused_moe/fused_moe.py"
    return path if path.is_file() else None


def test_without_a_gpu_it_refuses_with_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("gpu_check: no CUDA GPU (torch.cuda.is_available() is False); "
                   "--cpu-dry-run runs the code paths on the CPU\n")


def test_a_missing_vllm_source_is_refused_in_one_line(capsys, tmp_path):
    assert gpu_check.main(["--cpu-dry-run", "--vllm-src", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"gpu_check: --vllm-src {tmp_path}: no vllm/model_executor/layers/fused_moe/"
        "fused_moe.py there (give a vLLM source tree)\n")


@pytest.mark.parametrize("ratios", ["0.1,0", "0,0.7", "0,x"])
def test_bad_ratios_are_a_usage_error(ratios):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--cpu-dry-run", "--ratios", ratios])
    assert exc.value.code == 2


def test_host_reads_counts_each_read_and_restores_torch():
    item, to = torch.Tensor.item, torch.Tensor.to
    with gpu_check.host_reads() as seen:
        int(torch.tensor(3))
        torch.ones(2).tolist()
        torch.ones(2).to("cpu")
        torch.ones(2).to(torch.float64)  # a dtype cast reads nothing
    assert seen == ["__int__", "tolist", "to(cpu)"]
    assert torch.Tensor.item is item and torch.Tensor.to is to


def test_dry_run_drop_figures_match_the_planner():
    result = gpu_check.run(gpu_check.parse_args(["--cpu-dry-run"]))
    sizes = gpu_check.DRY
    routing = deepseek_routing(sizes["tokens"], sizes["skew"], ep_size=sizes["ep_size"],
                               num_experts=sizes["experts"], top_k=sizes["top_k"], seed=0)
    assert [row["ratio"] for row in result["rows"]] == [0.0, 0.01, 0.02, 0.05, 0.1]
    for row in result["rows"]:
        plan = plan_drops(routing.topk_weights, routing.topk_ids.to(torch.int32),
                          num_experts=sizes["experts"], ep_size=1,
                          options=CapacityOptions(drop_token_ratio=row["ratio"], min_tokens=0,
                                                  simulate_ep_size=sizes["ep_size"]))
        assert (row["rows"], row["dropped"]) == (plan.routed_rows, plan.dropped_rows)
        assert row["cuda_syncs"] is None  # no CUDA here: not counted, not guessed
        assert row["host_reads"] > 0 and "kernel_s" not in row
    assert result["rows"][0]["dropped"] == 0 and result["rows"][-1]["dropped"] > 0
    assert result["rows"][0]["step_ratio"] == 1.0
    assert result["kernel"] == "not run: no --vllm-src"


@pytest.mark.contract  # reads the installed vLLM line's own kernel source
@pytest.mark.skipif(_installed_kernel_file() is None, reason="no vLLM source file + Triton")
def test_dry_run_loads_vllms_kernel_and_the_kernel_path_skips_dropped_rows(capsys):
    path = _installed_kernel_file()
    args = gpu_check.parse_args(["--cpu-dry-run", "--vllm-src", str(path),
                                 "--check-tokens", "16"])
    result = gpu_check.run(args)
    assert result["kernel"] == f"torch emulation (dry run); {path} loaded"
    for row in result["rows"]:
        assert row["dropped_written"] == 0
        assert row["max_abs_err"] < 1e-4
    assert result["rows"][0]["dropped_here"] == 0
    assert sum(row["dropped_here"] for row in result["rows"]) > 0
    gpu_check.print_table(result)
    header = capsys.readouterr().out.splitlines()[2].split()
    assert header[:3] == ["r", "rows", "dropped"] and "written" in header


def test_an_unknown_kernel_signature_is_refused():
    kernel = SimpleNamespace(fn=lambda a_ptr, b_ptr, NEW_FLAG: None)
    with pytest.raises(gpu_check.Refusal, match=r"does not know: \['NEW_FLAG'\]"):
        gpu_check.kernel_arguments(kernel, *gpu_check._probe_arguments())


@pytest.mark.contract  # reads the installed vLLM line's own kernel source
@pytest.mark.skipif(_installed_kernel_file() is None, reason="no vLLM source file + Triton")
def test_vllms_real_kernel_in_tritons_interpreter_never_writes_a_dropped_slot(tmp_path):
    """vLLM's own fused_moe_kernel (compiled from the installed fused_moe.py, run by Triton's
    interpreter on the CPU) on what the adapter hands it: dropped slots stay NaN, the kept
    rows match the torch reference. The align op is the emulation (vLLM's is CUDA C++)."""
    out = tmp_path / "figures.json"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-dry-run", "--interpret", "--vllm-src",
         str(_installed_kernel_file()), "--ratios", "0,0.1", "--reps", "1",
         "--check-tokens", "8", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    result = json.loads(out.read_text())
    assert result["kernel"].endswith("Triton interpreter on the CPU")
    zero, tenth = result["rows"]
    assert zero["dropped"] == 0 and tenth["dropped"] > 0 and tenth["dropped_here"] > 0
    for row in result["rows"]:
        assert row["dropped_written"] == 0
        assert row["max_abs_err"] < 1e-4


def test_interpret_needs_the_dry_run_and_a_source():
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--interpret", "--vllm-src", "x"])
    assert exc.value.code == 2
