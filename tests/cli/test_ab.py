"""`ascend-patch ab`: the numbers it reports are computed honestly."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from ascend_patch.ab import offline, output
from ascend_patch.ab.common import Arm, compare, make_prompts
from ascend_patch.ab.engine import EngineFailed, EngineProcess
from ascend_patch.ab.offline import ArmRun, offline_metrics
from ascend_patch.ab.stats import (
    Estimate,
    block_order,
    estimate,
    median_interval_rank,
    paired_ratios,
    verdict,
)
from ascend_patch.cli.main import main
from ascend_patch.harness import offline_run


def outputs(token_ids, top_logprobs):
    return [{"prompt_tokens": 3, "token_ids": t, "top_logprobs": lp}
            for t, lp in zip(token_ids, top_logprobs)]


def test_compare_counts_exact_matches_tokens_and_logprob_gaps():
    ref = outputs([[1, 2, 3], [4, 5, 6]],
                  [[{"1": -0.1}, {"2": -0.2}, {"3": -0.3}], [{"4": -1.0}, {"5": -1.0}, {"6": -1.0}]])
    arm = outputs([[1, 2, 3], [4, 9, 6]],
                  [[{"1": -0.1}, {"2": -0.25}, {"3": -0.3}], [{"4": -1.5}, {"9": -0.5, "5": -0.9}, {"6": -1.0}]])
    got = compare(ref, arm, first_tokens=3)
    assert got["exact_match_rate"] == 0.5
    assert got["token_agreement"] == 5 / 6
    # prompt 1: |0|, |0.05|, |0|; prompt 2: |0.5| then the reference token 5 at -0.9 (diverged: stop)
    assert got["first_logprob_positions"] == 5
    assert got["first_logprob_mean_abs_diff"] == pytest.approx((0 + 0.05 + 0 + 0.5 + 0.1) / 5)
    assert got["first_logprob_missing"] == 0


def test_an_arm_agrees_fully_with_itself():
    ref = outputs([[7, 8]], [[{"7": -0.3}, {"8": -0.1}]])
    got = compare(ref, ref, first_tokens=2)
    assert (got["exact_match_rate"], got["token_agreement"], got["first_logprob_mean_abs_diff"]) == (1.0, 1.0, 0.0)


def test_prompts_are_deterministic():
    assert make_prompts(3, 5, seed=1) == make_prompts(3, 5, seed=1)
    assert make_prompts(3, 5, seed=1) != make_prompts(3, 5, seed=2)
    assert [len(p.split()) for p in make_prompts(3, 5, seed=1)] == [5, 5, 5]


# ---------------------------------------------------------------- interval maths


def test_order_statistic_ranks_match_the_binomial_table():
    # k of [x(k), x(n+1-k)], the published table of distribution-free 95% intervals of a median.
    assert {n: median_interval_rank(n)[0] for n in range(6, 21)} == {
        6: 1, 7: 1, 8: 1, 9: 2, 10: 2, 11: 2, 12: 3, 13: 3, 14: 3, 15: 4, 16: 4, 17: 5, 18: 5,
        19: 5, 20: 6}
    assert [median_interval_rank(n) for n in range(1, 6)] == [None] * 5
    # Coverage 1 - 2 * sum(C(n, j), j < k) / 2^n, exactly.
    assert median_interval_rank(6) == (1, 1 - 2 / 64)
    assert median_interval_rank(9) == (2, 1 - 2 * (1 + 9) / 512)
    assert median_interval_rank(17) == (5, 1 - 2 * (1 + 17 + 136 + 680 + 2380) / 2**17)


def test_median_interval_on_known_samples():
    assert estimate([5, 1, 4, 2, 3, 9, 7, 8, 6]) == Estimate(5, 2, 8, 0.9609375, 9)
    assert estimate([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == Estimate(3.5, 1.0, 6.0, 0.96875, 6)
    assert estimate(list(range(20, 0, -1))) == Estimate(10.5, 6, 15, pytest.approx(0.9586105), 20)
    assert estimate([1.0, 2.0, 3.0, 4.0, 5.0]) == Estimate(3.0, None, None, None, 5)


def test_paired_ratios_and_plain_verdicts():
    ref = [10.0, 12.0, 9.0, 11.0, 10.0, 8.0, 10.0, 13.0, 10.0]
    faster = [t / 1.25 for t in ref]  # every pair 1.25x: a clear difference
    ratios = paired_ratios(ref, faster)
    assert ratios == pytest.approx([1.25] * 9)
    assert verdict(estimate(ratios)) == "better"
    assert verdict(estimate(paired_ratios(faster, ref))) == "worse"
    mixed = paired_ratios([1.0] * 9, [0.9, 1.1, 1.0, 0.95, 1.05, 1.2, 0.8, 1.0, 1.02])
    assert estimate(mixed).holds(1.0)
    assert verdict(estimate(mixed)) == "no measurable difference"
    assert verdict(estimate([1.1, 1.2])) == "too few repeats for a 95% interval (n=2, need 6)"
    with pytest.raises(ValueError, match="pairs need equal counts"):
        paired_ratios([1.0], [1.0, 2.0])


def test_blocks_are_seeded_permutations_in_an_exact_order():
    assert block_order(3, 4, seed=0) == [[0, 2, 1], [2, 1, 0], [0, 1, 2], [0, 2, 1]]
    assert block_order(2, 5, seed=7) == [[0, 1], [1, 0], [0, 1], [1, 0], [1, 0]]
    assert block_order(3, 4, seed=0) == block_order(3, 4, seed=0)
    assert all(sorted(b) == [0, 1, 2, 3] for b in block_order(4, 50, seed=3))


# ---------------------------------------------------------------- offline metrics and table


def arm_run(label, prefill, tps, tokens=((1, 2),), ratio=None, config=Path("c.yaml")):
    run = ArmRun(Arm(label, config, ratio=ratio), engine=None, report_dir=Path("-"))
    run.samples = [{"block": i + 1, "position": 0, "prefill_s": p, "generate_s": 1.0,
                    "tokens": t, "tokens_per_s": t, "cpu_share": 0.9, "outputs_digest": "same"}
                   for i, (p, t) in enumerate(zip(prefill, tps))]
    run.outputs = outputs([list(t) for t in tokens], [[{str(x): -0.5} for x in t] for t in tokens])
    run.startup_s = 30.0
    run.perplexity = {"logprob_sum": -10.0, "tokens": 5}
    return run


REF_PREFILL = [0.10, 0.12, 0.11, 0.10, 0.13, 0.10, 0.11, 0.12, 0.10]


def test_offline_metrics_pair_each_repeat_with_the_reference_repeat():
    ref = arm_run("stock", REF_PREFILL, [100.0] * 9, config=None)
    same = arm_run("r=0", REF_PREFILL[::-1], [100.0] * 9, ratio=0.0)
    faster = arm_run("r=0.1", [p / 2 for p in REF_PREFILL], [150.0] * 9, tokens=((1, 3),),
                     ratio=0.1)
    rows = offline_metrics([ref, same, faster], first_tokens=2)
    assert rows[0]["stock"] and rows[0]["arm"] == "vLLM with no patch (ASCEND_PATCH_CONFIG unset)"
    assert rows[0]["prefill_speedup"] == Estimate(1.0, 1.0, 1.0, 0.9609375, 9)
    # Reversed order: the per-pair ratios are 0.1/0.1, 0.12/0.12, 0.11/0.11, 0.1/0.13, ...
    assert rows[1]["prefill_speedup"].median == pytest.approx(1.0)
    assert rows[1]["prefill_verdict"] == "no measurable difference"
    assert rows[2]["prefill_speedup"] == Estimate(pytest.approx(2.0), pytest.approx(2.0),
                                                  pytest.approx(2.0), 0.9609375, 9)
    assert rows[2]["prefill_verdict"] == "better"
    assert rows[2]["tokens_per_s_ratio"].median == pytest.approx(1.5)
    assert (rows[2]["exact_match_rate"], rows[2]["token_agreement"]) == (0.0, 0.5)
    assert rows[1]["perplexity"] == pytest.approx(7.38905609893065)  # exp(10 / 5)


def render(fn, *a) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, highlight=False, color_system=None)
    fn(console, *a)
    return buffer.getvalue()


def test_offline_table_fits_80_columns_with_a_legend_for_long_labels():
    ref = arm_run("stock", REF_PREFILL, [12345.0] * 9, config=None)
    long = arm_run("cpu-ep-with-a-long-name", [p * 1.01 for p in REF_PREFILL], [12000.0] * 9)
    rows = offline_metrics([ref, long], first_tokens=2)
    text = render(offline.print_offline, rows, "heading")
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert " A     110 [100, 120]   12345 [12345, 12345]      90        -   7.389" in text, text
    assert " B     0.990 [0.990, 0.990]   0.972 [0.972, 0.972]   100.0%    0.0000" in text, text
    assert ("B vs A: prefill worse (0.990 [0.990, 0.990]); tokens/s worse (0.972 [0.972,\n"
            "  0.972]); greedy outputs identical for 100% of the prompts.") in text, text
    assert "  A = stock: vLLM with no patch (ASCEND_PATCH_CONFIG unset)" in text, text
    assert "  B = cpu-ep-with-a-long-name: c.yaml" in text, text


def test_offline_table_fits_80_columns_with_the_longest_plain_labels():
    rows = offline_metrics([arm_run("r=0.05#2", REF_PREFILL, [12345.0] * 9),
                            arm_run("r=0.125#", REF_PREFILL, [1234.5] * 9)], first_tokens=2)
    text = render(offline.print_offline, rows, "heading")
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert " r=0.125#   1.000 [1.000, 1.000]   0.100 [0.100, 0.100]" in text, text


# ---------------------------------------------------------------- engines (fake and real processes)


class FakeEngine:
    """Stands in for EngineProcess: answers like offline_run --driver, with made-up timings."""

    started: list["FakeEngine"] = []

    def __init__(self, label, cmd, env, log_path):
        self.label, self.cmd, self.env = label, cmd, env
        self.calls = 0
        self.stopped = False
        FakeEngine.started.append(self)

    settle_s = 0.0  # no vLLM worker polls after a request here

    def start(self):
        pass

    def wait_ready(self, timeout):
        return 12.0

    def request(self, op, out, timeout):
        if op == "perplexity":
            return {"logprob_sum": -4.0, "tokens": 4}
        self.calls += 1
        slow = 2.0 if "r=0.1" in self.label else 1.0
        return {"prefill_s": 0.1 * slow + 0.001 * self.calls, "generate_s": 1.0 * slow,
                "outputs": outputs([[1, 2]], [[{"1": -0.1}, {"2": -0.2}]])}

    def stop(self):
        self.stopped = True


class SettlingEngine(FakeEngine):
    settle_s = 0.25  # as if its worker polled for a while after each request


def test_offline_ab_keeps_one_engine_per_arm_and_interleaves(monkeypatch, tmp_path, write_config,
                                                            tiny_model):
    FakeEngine.started = []
    monkeypatch.setattr(offline, "EngineProcess", SettlingEngine)
    sleeps = []
    monkeypatch.setattr(offline.time, "sleep", sleeps.append)
    config = write_config("version: 1\npatches:\n  - {name: moe, impl: moe.capacity}\n")
    out = tmp_path / "out"
    assert main(["ab", str(config), "--stock", "--ratios", "0,0,0.1", "--model", str(tiny_model),
                 "--num-prompts", "1", "--repeats", "6", "--out", str(out)]) == 0
    engines = FakeEngine.started
    assert [e.label for e in engines] == ["stock", "r=0", "r=0#2", "r=0.1"]
    assert all(e.calls == 7 and e.stopped for e in engines)  # one warm-up + 6, one engine each
    # Two arms never share a report folder; the stock arm has no config and no report.
    assert "ASCEND_PATCH_CONFIG" not in engines[0].env
    assert "ASCEND_PATCH_REPORT_DIR" not in engines[0].env
    assert [e.env["ASCEND_PATCH_REPORT_DIR"].rsplit("/", 1)[1] for e in engines[1:]] == [
        "arm1-reports", "arm2-reports", "arm3-reports"]
    assert all("--driver" in e.cmd for e in engines)
    summary = json.loads((out / "ab.json").read_text())
    labels = ["stock", "r=0", "r=0#2", "r=0.1"]
    assert summary["order"] == [[labels[i] for i in b] for b in block_order(4, 7, seed=0)]
    # Before each request to another engine than the last one, that engine's settle time.
    runs = [i for block in block_order(4, 7, seed=0) for i in block]
    switches = sum(a != b for a, b in zip(runs, runs[1:]))
    assert [t for t in sleeps if t == SettlingEngine.settle_s] == [0.25] * switches
    assert switches < len(runs) - 1  # seed 0 starts a block with the arm the last one ended
    arms = summary["arms"]
    assert [a["label"] for a in arms] == labels
    assert [len(a["samples"]) for a in arms] == [6, 6, 6, 6]
    assert [len(a["warmup_samples"]) for a in arms] == [1, 1, 1, 1]
    assert arms[3]["prefill_verdict"] == "worse" and arms[3]["tokens_per_s_ratio"]["median"] == 0.5
    assert arms[1]["exact_match_rate"] == 1.0
    assert arms[1]["perplexity"] == pytest.approx(2.718281828)
    assert (out / "ab.png").stat().st_size > 0


def test_plot_is_skipped_in_one_line_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path, message = output.plot(tmp_path / "ab.png", "t", ["a"], {"x": [None]}, {"y": [1.0]})
    assert path is None and not (tmp_path / "ab.png").exists()
    assert message == ("ab.png skipped: matplotlib is not installed "
                       "(pip install 'ascend-patch[tools]')")


class FakeLLM:
    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(params)

        class Out:
            prompt_token_ids = [5, 6, 7]
            prompt_logprobs = [None, {6: type("L", (), {"logprob": -1.0})},
                               {7: type("L", (), {"logprob": -2.0})}]
            outputs = [type("O", (), {"token_ids": [9], "logprobs": None})]

        return [Out() for _ in prompts]


@pytest.mark.contract  # the driver builds vLLM's real SamplingParams
def test_driver_protocol_writes_results_and_reports_failures(tmp_path, capsys):
    args = type("A", (), {"max_tokens": 1, "seed": 0, "logprobs": 0})
    commands = [json.dumps({"id": 1, "op": "run", "out": str(tmp_path / "r.json")}),
                json.dumps({"id": 2, "op": "perplexity", "out": str(tmp_path / "p.json")}),
                json.dumps({"id": 3, "op": "nope", "out": str(tmp_path / "x.json")}),
                json.dumps({"op": "quit"}),
                json.dumps({"id": 4, "op": "run", "out": str(tmp_path / "never.json")})]
    offline_run.drive(FakeLLM(), ["a b c", "d e f"], args, commands)
    assert capsys.readouterr().out.splitlines() == [
        'ASCEND_PATCH_DONE {"id": 1}', 'ASCEND_PATCH_DONE {"id": 2}',
        'ASCEND_PATCH_FAILED {"id": 3, "error": "ValueError: unknown op \'nope\'"}']
    run = json.loads((tmp_path / "r.json").read_text())
    assert run["outputs"] == [{"prompt_tokens": 3, "token_ids": [9], "top_logprobs": []}] * 2
    # Per prompt as well: the tuner's paired loss intervals resample prompts.
    assert json.loads((tmp_path / "p.json").read_text()) == {
        "logprob_sum": -6.0, "tokens": 4,
        "per_prompt": [{"logprob_sum": -3.0, "tokens": 2}, {"logprob_sum": -3.0, "tokens": 2}]}
    assert not (tmp_path / "never.json").exists()


def child(tmp_path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(body)
    return [sys.executable, str(script)]


def test_engine_that_never_gets_ready_is_killed_with_its_group(tmp_path):
    # The child starts a grandchild in its group and then stays silent.
    cmd = child(tmp_path, "import subprocess, sys, time\n"
                          "p = subprocess.Popen([sys.executable, '-c', "
                          "'import time; time.sleep(600)'])\n"
                          "print('grandchild', p.pid, flush=True)\n"
                          "time.sleep(600)\n")
    engine = EngineProcess("slow", cmd, {"PATH": "/usr/bin:/bin"}, tmp_path / "slow.log")
    engine.start()
    began = time.monotonic()
    with pytest.raises(EngineFailed, match=r"arm slow: no answer within 2 s \(still running\)"):
        engine.wait_ready(timeout=2)
    assert time.monotonic() - began < 5
    grandchild = int(engine.log_tail().split()[1])
    engine.stop(grace=1)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and time.monotonic() < deadline:
        state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{grandchild}").exists() or state == "Z"


def test_engine_that_dies_fails_at_once_with_its_log(tmp_path):
    cmd = child(tmp_path, "import sys\n"
                          "print('ASCEND_PATCH_READY {\"startup_s\": 1.5}', flush=True)\n"
                          "sys.stdin.readline()\nprint('Segmentation fault', flush=True)\n"
                          "sys.exit(139)\n")
    engine = EngineProcess("crash", cmd, {"PATH": "/usr/bin:/bin"}, tmp_path / "crash.log")
    engine.start()
    assert engine.wait_ready(timeout=30) == 1.5
    began = time.monotonic()
    with pytest.raises(EngineFailed, match="arm crash: the engine exited") as failure:
        engine.request("run", tmp_path / "r.json", timeout=60)
    assert time.monotonic() - began < 10
    assert "Segmentation fault" in str(failure.value)
    assert engine.stop() == 139


@pytest.mark.vllm
def test_stock_dropless_and_dropping_arms_in_the_real_engine(tmp_path, write_config, tiny_model):
    # moe.capacity in the real engine (tiny DeepseekV3: sigmoid grouped routing, a shared
    # expert): stock vLLM, r = 0 and r = 0.1 in three engines, the fewest that show it (each
    # start is most of the cost on the 2-core CI machine). The ops patches ride along: stock
    # and r = 0 agreeing token for token shows them bit-exact inside the engine too.
    config = write_config("""
        version: 1
        patches:
          - name: moe
            impl: moe.capacity
            options: {min_tokens: 0}
          - name: rms
            impl: ops.rms_norm
          - name: swiglu
            impl: ops.silu_and_mul
    """)
    out = subprocess.run(
        [sys.executable, "-m", "ascend_patch", "ab", str(config), "--stock", "--ratios", "0,0.1",
         "--model", str(tiny_model), "--num-prompts", "4", "--prompt-len", "64", "--max-tokens",
         "4", "--repeats", "2", "--out", str(tmp_path / "ab")],
        capture_output=True, text=True, timeout=560,  # inside pytest's 600 s: the log is shown
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "ab" / "ab.json").read_text())
    stock, dropless, dropping = summary["arms"]
    assert [a["label"] for a in summary["arms"]] == ["stock", "r=0", "r=0.1"]
    assert [len(a["samples"]) for a in summary["arms"]] == [2, 2, 2]
    assert [len(a["warmup_samples"]) for a in summary["arms"]] == [1, 1, 1]
    # Unpatched vLLM and moe.capacity at r=0 give the same greedy tokens on every prompt.
    assert (dropless["exact_match_rate"], dropless["token_agreement"]) == (1.0, 1.0)
    assert dropless["repeats_identical"] and stock["repeats_identical"]
    assert stock["report"] == {} and stock["rows_dropped"] is None
    assert dropless["rows_dropped"] == 0 and dropless["rows_routed"] > 0
    patches = dropless["report"]["patches"]
    moe = patches["moe"]
    assert "applied" in moe["status"].values() and moe["options"]["drop_token_ratio"] == 0.0
    assert all("applied" in patches[name]["status"].values() for name in ("rms", "swiglu"))
    # The first layer is dense (first_k_dense_replace: 1): one MoE layer, taken over, and
    # at r = 0.1 at most a tenth of its routed rows dropped.
    assert list(dropless["layers"]) == list(dropping["layers"]) == ["model.layers.1.mlp.experts"]
    assert dropless["layers"]["model.layers.1.mlp.experts"]["drop_fraction"] == 0
    assert 0 < dropping["rows_dropped"] <= int(0.1 * dropping["rows_routed"])
    assert 0 < dropping["layers"]["model.layers.1.mlp.experts"]["drop_fraction"] <= 0.1
    # Perplexity of the prompts from prompt logprobs, for both arms.
    assert all(a["perplexity"] > 1 and a["perplexity_tokens"] == 4 * 63 for a in summary["arms"])
    assert all(0 < s["cpu_share"] for a in summary["arms"] for s in a["samples"])
    # The summary is prose wrapped at 80 columns: where a line breaks depends on the figures.
    assert "too few repeats for a 95% interval (n=2, need 6)" in " ".join(out.stdout.split())
    assert (tmp_path / "ab" / "ab.png").stat().st_size > 0


def test_driver_ends_its_group_when_ab_is_killed(tmp_path):
    """An A/B killed with SIGKILL runs no cleanup: the engine notices its parent is gone."""
    # A prompts "file" that is a FIFO nobody writes: the driver blocks reading it for ever,
    # so only its parent watch can end it.
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    parent = child(tmp_path, "import os, subprocess, sys, time\n"
                             "p = subprocess.Popen([sys.executable, '-m', "
                             "'ascend_patch.harness.offline_run', "
                             f"'no-model', '--prompts-json', {str(fifo)!r}, '--driver'], "
                             "start_new_session=True, stdin=subprocess.PIPE)\n"
                             "print(p.pid, flush=True)\ntime.sleep(0.5)\nos._exit(0)\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(offline.__file__).parents[2])}
    out = subprocess.run(parent, capture_output=True, text=True, timeout=60, env=env)
    driver = int(out.stdout.split()[0])
    # run() returned once the driver closed the inherited pipes: killed, not failed.
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{driver}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break  # gone
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"driver {driver} still running 15 s after its parent died")


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
    assert ("ab-layer.png skipped: matplotlib is not installed (pip install "
            "'ascend-patch[tools]')") in lines
