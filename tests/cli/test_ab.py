"""`ascend-patch ab`: the numbers it reports are computed honestly."""

import json
import subprocess
import sys

import pytest

from ascend_patch.cli.ab import Arm, ArmResult, compare, make_prompts


def result(token_ids, top_logprobs):
    return {"outputs": [{"prompt_tokens": 3, "token_ids": t, "top_logprobs": lp}
                        for t, lp in zip(token_ids, top_logprobs)],
            "prefill_s": 1.0, "generate_s": 1.0}


def arm_result(token_ids, top_logprobs):
    return ArmResult(Arm("x", None), result(token_ids, top_logprobs), {}, None)


def test_compare_counts_exact_matches_tokens_and_logprob_gaps():
    ref = arm_result([[1, 2, 3], [4, 5, 6]],
                     [[{"1": -0.1}, {"2": -0.2}, {"3": -0.3}], [{"4": -1.0}, {"5": -1.0}, {"6": -1.0}]])
    arm = arm_result([[1, 2, 3], [4, 9, 6]],
                     [[{"1": -0.1}, {"2": -0.25}, {"3": -0.3}], [{"4": -1.5}, {"9": -0.5, "5": -0.9}, {"6": -1.0}]])
    got = compare(ref, arm, first_tokens=3)
    assert got["exact_match_rate"] == 0.5
    assert got["token_agreement"] == 5 / 6
    # prompt 1: |0|, |0.05|, |0|; prompt 2: |0.5| then the reference token 5 at -0.9 (diverged: stop)
    assert got["first_logprob_positions"] == 5
    assert got["first_logprob_mean_abs_diff"] == pytest.approx((0 + 0.05 + 0 + 0.5 + 0.1) / 5)
    assert got["first_logprob_missing"] == 0


def test_an_arm_agrees_fully_with_itself():
    ref = arm_result([[7, 8]], [[{"7": -0.3}, {"8": -0.1}]])
    got = compare(ref, ref, first_tokens=2)
    assert (got["exact_match_rate"], got["token_agreement"], got["first_logprob_mean_abs_diff"]) == (1.0, 1.0, 0.0)


def test_prompts_are_deterministic():
    assert make_prompts(3, 5, seed=1) == make_prompts(3, 5, seed=1)
    assert make_prompts(3, 5, seed=1) != make_prompts(3, 5, seed=2)
    assert [len(p.split()) for p in make_prompts(3, 5, seed=1)] == [5, 5, 5]


@pytest.mark.vllm
def test_ab_over_drop_ratios_with_the_real_engine(tmp_path, write_config):
    config = write_config("""
        version: 1
        patches:
          - name: moe
            impl: moe.capacity
            options: {min_tokens: 0}
    """)
    out = subprocess.run(
        [sys.executable, "-m", "ascend_patch", "ab", str(config), "--ratios", "0,0,0.1",
         "--prompts", "4", "--prompt-len", "64", "--max-tokens", "4", "--out", str(tmp_path / "ab")],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "ab" / "ab.json").read_text())
    reference, again, dropped = summary["arms"]
    assert [a["drop_token_ratio"] for a in summary["arms"]] == [0.0, 0.0, 0.1]
    for arm in (reference, again):
        assert arm["rows_dropped"] == 0
        assert arm["rows_routed"] > 0
    # The reference agrees with itself; a second dropless run of the same engine does too.
    assert (reference["exact_match_rate"], reference["first_logprob_mean_abs_diff"]) == (1.0, 0.0)
    assert (again["exact_match_rate"], again["token_agreement"]) == (1.0, 1.0)
    # Drops happen, and never more than the budget (each call drops at most floor(0.1 * rows)).
    assert 0 < dropped["rows_dropped"] <= int(0.1 * dropped["rows_routed"])
    assert dropped["rows_routed"] == reference["rows_routed"]
    for layer in dropped["layers"].values():
        assert layer["max_over_mean_after"] <= layer["max_over_mean_before"]
    assert (tmp_path / "ab" / "ab.png").stat().st_size > 0


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib as if not installed: `import matplotlib` raises ImportError."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_ab_layer_without_matplotlib_writes_json_and_table_and_says_how_to_get_the_png(
        tmp_path, capsys, no_matplotlib):
    from ascend_patch.cli.main import main

    out = tmp_path / "layer"
    code = main(["ab", "--layer", "--skews", "1.5", "--ratios", "0,0.1", "--tokens", "256",
                 "--experts", "16", "--top-k", "2", "--ep-size", "4", "--hidden", "32",
                 "--intermediate", "32", "--dtype", "float32", "--no-timing", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert sorted(p.name for p in out.iterdir()) == ["ab-layer.json"]
    assert [c["ratio"] for c in json.loads((out / "ab-layer.json").read_text())["cells"]
            if c["policy"] == "probs"] == [0.0, 0.1]
    lines = printed.splitlines()
    assert f"wrote {out / 'ab-layer.json'}" in lines
    assert ("ab-layer.png skipped: matplotlib is not installed (to get it: pip install "
            "'ascend-patch[tools]')") in lines


def _two_arms():
    row = {"label": "r=0", "drop_token_ratio": 0.0, "tokens_per_s": 10.0, "prefill_s": 0.5,
           "speedup_vs_reference": 1.0, "rows_dropped_pct": 0.0, "exact_match_rate": 1.0,
           "token_agreement": 1.0, "first_logprob_mean_abs_diff": 0.0,
           "layers": {"l1": {"max_over_mean_before": 1.5, "max_over_mean_after": 1.2}}}
    summary = {"model": "/m/tiny", "prompts": 2, "prompt_len": 8, "max_tokens": 4, "seed": 0,
               "arms": [row, {**row, "label": "r=0.1", "drop_token_ratio": 0.1}]}
    return summary


def test_ab_results_with_matplotlib_include_the_png(tmp_path, capsys):
    from rich.console import Console

    from ascend_patch.cli.ab import write_results

    write_results(_two_arms(), tmp_path, Console(width=200, soft_wrap=True))
    assert (tmp_path / "ab.png").stat().st_size > 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"wrote {tmp_path / 'ab.json'} and {tmp_path / 'ab.png'}")


def test_ab_results_without_matplotlib(tmp_path, capsys, no_matplotlib):
    from rich.console import Console

    from ascend_patch.cli.ab import write_results

    summary = _two_arms()
    write_results(summary, tmp_path, Console(width=200, soft_wrap=True))
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "ab.json").read_text()) == summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ab.json"]
    assert "1.50->1.20" in printed  # the table
    assert printed.splitlines()[-2:] == [
        f"wrote {tmp_path / 'ab.json'}",
        "ab.png skipped: matplotlib is not installed (to get it: pip install "
        "'ascend-patch[tools]')"]
