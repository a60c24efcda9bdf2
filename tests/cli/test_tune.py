"""`ascend-patch tune`: the loss interval, the choice, the profile it writes and its errors.

The engine runs are the A/B's (tested with `ab`); here the pieces that decide and write are
fed known numbers and checked exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from ascend_patch.ab.stats import Estimate, estimate
from ascend_patch.ab.tune import (
    Candidate,
    Loss,
    TuneFailed,
    candidate_arms,
    candidates_from,
    choose,
    config_text,
    loss_interval,
    profile_for,
    profile_name,
    write_config,
)
from ascend_patch.cli.main import main
from ascend_patch.core.versions import detect_stack
from tests.cli.test_ab_server import FakeOpenAI

BASE = """version: 1
patches:
  - name: moe
    impl: moe.capacity
    options: {min_tokens: 64}
"""


def speed(lo, median, hi):
    return Estimate(median, lo, hi, 0.96, 9)


def loss(hi, mean=0.0):
    return Loss(mean, mean - 0.01, hi, 16)


# ------------------------------------------------------------------------ loss interval


def test_loss_interval_is_the_t_interval_over_prompts():
    reference = [{"logprob_sum": -100.0, "tokens": 50}, {"logprob_sum": -60.0, "tokens": 30},
                 {"logprob_sum": -40.0, "tokens": 20}]
    arm = [{"logprob_sum": -102.0, "tokens": 50}, {"logprob_sum": -63.0, "tokens": 30},
           {"logprob_sum": -40.0, "tokens": 20}]
    # Per prompt 0.04, 0.1, 0.0 nats/token: mean 0.046667, sd 0.050332, t(0.975, 2) = 4.303.
    result = loss_interval(reference, arm)
    assert result.n == 3
    assert result.mean == pytest.approx(0.0466667, abs=1e-6)
    assert result.hi == pytest.approx(0.0466667 + 4.303 * 0.0503322 / 3 ** 0.5, abs=1e-6)
    assert result.lo == pytest.approx(0.0466667 - 4.303 * 0.0503322 / 3 ** 0.5, abs=1e-6)
    one = loss_interval(reference[:1], arm[:1])
    assert (one.mean, one.lo, one.hi) == (pytest.approx(0.04), None, None)
    with pytest.raises(ValueError):
        loss_interval(reference, arm[:2])


# ----------------------------------------------------------------------------- choice


def test_the_largest_ratio_within_budget_and_faster_wins():
    candidates = [
        Candidate(0.05, "drop", loss(0.004), speed(1.01, 1.03, 1.05)),
        Candidate(0.1, "drop", loss(0.02), speed(1.02, 1.06, 1.09)),   # over the budget
        Candidate(0.1, "reroute", loss(0.008), speed(1.01, 1.04, 1.07)),
        Candidate(0.2, "reroute", loss(0.009), speed(0.97, 1.02, 1.06)),  # not measurable
    ]
    choice = choose(candidates, 0.01)
    assert choice.candidate is candidates[2]
    assert choice.options == {"drop_token_ratio": 0.1, "overflow": "reroute"}
    assert choice.reason == ("r=0.1 reroute: the largest setting whose loss bound 0.008 is "
                             "within 0.01 nats/token and whose prefill speed-up [1.010, 1.070] "
                             "is above 1")


def test_equal_ratios_go_to_the_faster_then_the_lower_loss_then_drop():
    a = Candidate(0.1, "drop", loss(0.005), speed(1.01, 1.04, 1.07))
    b = Candidate(0.1, "reroute", loss(0.004), speed(1.01, 1.05, 1.07))
    assert choose([a, b], 0.01).candidate is b
    c = Candidate(0.1, "reroute", loss(0.004), speed(1.01, 1.04, 1.07))
    assert choose([a, c], 0.01).candidate is c
    d = Candidate(0.1, "reroute", loss(0.005), speed(1.01, 1.04, 1.07))
    assert choose([d, a], 0.01).candidate is a


def test_no_measurable_gain_picks_r0_and_says_so():
    candidates = [Candidate(0.05, "drop", loss(0.004), speed(0.98, 1.01, 1.03)),
                  Candidate(0.1, "drop", loss(0.03), speed(1.02, 1.05, 1.08))]
    choice = choose(candidates, 0.01)
    assert choice.candidate is None
    assert choice.options == {"drop_token_ratio": 0.0}
    assert choice.reason == ("r=0: no setting within the budget gives a measurable speed gain "
                             "(prefill speed-up intervals: r=0.05 drop [0.980, 1.030])")


def test_nothing_within_the_budget_picks_r0_and_lists_the_bounds():
    candidates = [Candidate(0.05, "drop", loss(0.02), speed(1.02, 1.05, 1.08)),
                  Candidate(0.1, "drop", Loss(0.0, None, None, 1), speed(1.02, 1.05, 1.08))]
    choice = choose(candidates, 0.01)
    assert choice.candidate is None
    assert choice.reason == ("r=0: no setting's loss interval stays within 0.01 nats/token "
                             "(upper bounds: r=0.05 drop 0.02, r=0.1 drop none (fewer than 2 "
                             "prompts))")


def test_candidates_come_from_the_runs_in_arm_order(tmp_path):
    config = tmp_path / "c.yaml"
    arms = candidate_arms(config, "moe", [0.1, 0.2], ["drop", "reroute"])
    assert [(a.label, a.override) for a in arms] == [
        ("r=0", {"moe": {"drop_token_ratio": 0.0}}),
        ("r=0.1 drop", {"moe": {"drop_token_ratio": 0.1, "overflow": "drop"}}),
        ("r=0.1 reroute", {"moe": {"drop_token_ratio": 0.1, "overflow": "reroute"}}),
        ("r=0.2 drop", {"moe": {"drop_token_ratio": 0.2, "overflow": "drop"}}),
        ("r=0.2 reroute", {"moe": {"drop_token_ratio": 0.2, "overflow": "reroute"}}),
    ]
    nlls = [{"per_prompt": [{"logprob_sum": -10.0 - index, "tokens": 10},
                            {"logprob_sum": -20.0 - index, "tokens": 10}]}
            for index in range(len(arms))]
    speedups = [estimate([1.0 + i / 100] * 9) for i in range(len(arms))]
    candidates = candidates_from(arms, nlls, speedups)
    assert [(c.ratio, c.overflow, c.loss.mean, c.speedup.median, c.measure)
            for c in candidates] == [
        (0.1, "drop", pytest.approx(0.1), 1.01, "prefill"),
        (0.1, "reroute", pytest.approx(0.2), 1.02, "prefill"),
        (0.2, "drop", pytest.approx(0.3), 1.03, "prefill"),
        (0.2, "reroute", pytest.approx(0.4), 1.04, "prefill")]
    live = candidates_from(arms[:2], nlls[:2], speedups[:2], measure="TTFT")
    assert [(c.label, c.measure) for c in live] == [("r=0.1 drop", "TTFT")]
    assert choose(live, 1.0).reason == (
        "r=0.1 drop: the largest setting whose loss bound 0.1 is within 1 nats/token and whose "
        "TTFT speed-up [1.010, 1.010] is above 1")


def test_an_arm_without_prompt_logprobs_stops_the_tuner_with_its_reason(tmp_path):
    arms = candidate_arms(tmp_path / "c.yaml", "moe", [0.1], ["drop"])
    nll = {"per_prompt": [{"logprob_sum": -1.0, "tokens": 1}]}
    with pytest.raises(TuneFailed) as info:
        candidates_from(arms, [nll, {"error": "HTTP 400: echo not supported"}],
                        [estimate([1.0] * 9)] * 2)
    assert str(info.value) == ("r=0.1 drop: no prompt log-probabilities (HTTP 400: echo not "
                               "supported): no loss to tune on")


# ---------------------------------------------------------------------- profile, file


def tuned_profile():
    choice = choose([Candidate(0.1, "reroute", loss(0.008, 0.003), speed(1.01, 1.04, 1.07))],
                    0.01)
    return profile_for(choice, patch="moe", architectures=["MixtralForCausalLM"], line="0.32",
                       evidence={"date": "2026-12-07T06:00:00Z", "samples": [1, 2]})


def test_profile_matches_architecture_and_line_and_pins_the_options():
    profile = tuned_profile()
    assert profile["match"] == {"architectures": ["MixtralForCausalLM"], "vllm": ">=0.32,<0.33"}
    assert profile["patches"] == {"moe": {"options": {"drop_token_ratio": 0.1,
                                                      "overflow": "reroute"}}}
    assert profile["evidence"] == {"date": "2026-12-07T06:00:00Z", "samples": [1, 2]}
    assert profile_name(["MixtralForCausalLM"], "0.32") == "tuned-mixtralforcausallm-vllm0-32"


def test_written_config_validates_and_plan_chooses_it(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(BASE)
    target = tmp_path / "out" / "tuned.yaml"
    target.parent.mkdir()
    write_config(target, config_text(base, target, "tuned", tuned_profile()))
    body = yaml.safe_load(target.read_text())
    assert body["extends"] == "../base.yaml"
    assert main(["validate", str(target)]) == 0
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["MixtralForCausalLM"]}')
    capsys.readouterr()
    assert main(["plan", "--json", "--no-check", "--vllm-line", "0.32", "--platform", "cpu",
                 "--model", str(model), str(target)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["profile"] == "tuned"
    (moe,) = plan["patches"]
    assert moe["options"]["drop_token_ratio"] == 0.1
    assert moe["options"]["overflow"] == "reroute"
    assert moe["options"]["min_tokens"] == 64  # the base's, kept


def test_an_interrupted_write_leaves_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "tuned.yaml"
    target.write_text("previous\n")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_config(target, "new\n")
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned.yaml"]


# ---------------------------------------------------------------------------- errors


def run_tune(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ascend_patch", "tune", *args],
                          capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "other.yaml").write_text("version: 1\npatches: []\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"architectures": ["X"]}')
    (tmp_path / "afile").write_text("")
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["base.yaml", "--max-loss", "0.1"], "the following arguments are required: --model"),
    (["base.yaml", "--model", "model"], "the following arguments are required: --max-loss"),
    (["missing.yaml", "--model", "model", "--max-loss", "0.1"],
     "argument CONFIG: missing.yaml is not a file"),
    (["base.yaml", "--model", "afile", "--max-loss", "0.1"],
     "argument --model: afile is not a model directory (no config.json)"),
    (["base.yaml", "--model", "model", "--max-loss", "nan"],
     "argument --max-loss: 'nan': give a loss >= 0 in nats per token"),
    (["base.yaml", "--model", "model", "--max-loss", "x"],
     "argument --max-loss: 'x' is not a number (nats per token)"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--ratios", "0.1,0.6"],
     "argument --ratios: '0.6' is out of range (drop_token_ratio is in [0, 0.5])"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--ratios", "0.1,0.1"],
     "argument --ratios: '0.1,0.1' names a ratio twice"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--overflow", "drop,drop"],
     "argument --overflow: 'drop,drop': give drop, reroute or both, comma separated, each once"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--write", "base.yaml"],
     "argument --write: base.yaml is CONFIG itself; the profile goes in a config that extends it"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--write", "nowhere/t.yaml"],
     "argument --write: the folder of nowhere/t.yaml does not exist"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--write", "model"],
     "argument --write: model is a folder"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--profile", "a b"],
     "argument --profile: 'a b' is not a profile name (1-64 letters, digits, '_', '.', '-', "
     "starting with a letter or digit)"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--out", "afile"],
     "argument --out: afile exists and is not a folder"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--requests", "4"],
     "argument --requests: goes with --launch (the live servers' rounds)"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--concurrency", "2"],
     "argument --concurrency: goes with --launch (the live servers' rounds)"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--one-at-a-time"],
     "argument --one-at-a-time: goes with --launch (the live servers' rounds)"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--launch", "--requests", "0"],
     "argument --requests: 0 is out of range (1 to 10000)"),
    (["base.yaml", "--model", "model", "--max-loss", "0.1", "--launch", "--concurrency", "x"],
     "argument --concurrency: 'x' is not an integer"),
])
def test_bad_arguments_exit_2_with_one_line(setup, argv, message):
    out = run_tune(*argv, cwd=setup)
    assert out.returncode == 2
    assert out.stderr == f"ascend-patch tune: error: {message}\n"


def test_a_config_without_moe_capacity_exits_2_before_any_engine(setup):
    out = run_tune("other.yaml", "--model", "model", "--max-loss", "0.1", "--overflow", "drop",
                   cwd=setup)
    assert out.returncode == 2
    assert "other.yaml has no moe.capacity patch" in out.stderr
    assert not (setup / "tune-out").exists()


# ------------------------------------------------------------------ live servers (--launch)


class LaunchedFake:
    """Stands in for harness.server.ManagedServer: a fake OpenAI server whose prompt logprob
    and time to first token follow the drop ratio in the environment it was given, as a
    launched vLLM server's follow ASCEND_PATCH_OVERRIDE."""

    launched: ClassVar[list[dict]] = []

    def __init__(self, model, *, args, env, log_path, startup_timeout, load_format,
                 enforce_eager):
        ratio = json.loads(env["ASCEND_PATCH_OVERRIDE"])["moe"]["drop_token_ratio"]
        # r = 0: -1.0 per token and 200 ms to the first token; r: r nats/token more, and
        # 20 ms: ten times faster, so that a busy machine cannot blur the difference.
        self.fake = FakeOpenAI(step_s=0.001, first_s=0.2 if ratio == 0 else 0.02,
                               prompt_logprob=-1.0 - ratio)
        self.base_url, self.cmd, self.proc = self.fake.url, ["python", "-m", "vllm"], None
        LaunchedFake.launched.append({"config": env["ASCEND_PATCH_CONFIG"],
                                      "override": env["ASCEND_PATCH_OVERRIDE"],
                                      "args": list(args), "fake": self.fake})

    def start(self):
        self.running = self.fake.running()
        self.running.__enter__()
        self.proc = types.SimpleNamespace(pid=0)

    def stop(self, grace):
        if self.proc is not None:
            self.running.__exit__(None, None, None)
            self.proc = None


def test_launch_runs_one_server_per_arm_and_tunes_on_their_nll_and_ttft(setup, monkeypatch,
                                                                        capsys):
    from ascend_patch.harness import server

    monkeypatch.setattr(server, "ManagedServer", LaunchedFake)
    LaunchedFake.launched = []
    target = setup / "tuned.yaml"
    code = main(["tune", str(setup / "base.yaml"), "--model", str(setup / "model"),
                 "--max-loss", "0.15", "--ratios", "0.1,0.2", "--overflow", "drop",
                 "--launch", "--one-at-a-time", "--requests", "2", "--concurrency", "2",
                 "--repeats", "6", "--warmup", "0", "--max-tokens", "2", "--num-prompts", "3",
                 "--prompt-len", "5", "--write", str(target), "--out", str(setup / "out")])
    printed = capsys.readouterr()
    assert code == 0, printed
    config = str((setup / "base.yaml").resolve())
    assert [(x["config"], json.loads(x["override"])) for x in LaunchedFake.launched] == [
        (config, {"moe": {"drop_token_ratio": 0.0}}),
        (config, {"moe": {"drop_token_ratio": 0.1, "overflow": "drop"}}),
        (config, {"moe": {"drop_token_ratio": 0.2, "overflow": "drop"}})]
    for x in LaunchedFake.launched:  # 6 rounds of 2 requests, 3 echoed held-out prompts
        assert x["fake"].paths.count("/v1/completions") == 6 * 2 + 3
        assert "--no-enable-prefix-caching" in x["args"]
    (name, profile), = yaml.safe_load(target.read_text())["profiles"].items()
    assert name == profile_name(["X"], detect_stack().line)
    assert profile["patches"] == {"moe": {"options": {"drop_token_ratio": 0.1,
                                                      "overflow": "drop"}}}
    evidence = profile["evidence"]
    assert evidence["chosen"] == "r=0.1 drop"
    assert evidence["mode"].startswith("live servers, one per arm (one at a time")
    assert (evidence["requests"], evidence["concurrency"]) == (2, 2)
    # Every prompt: 4 scored tokens at -1 - r against -1, so exactly r nats/token, sd 0.
    assert [(a["label"], a["nll_increase"]["mean"], a["nll_increase"]["lo"],
             a["nll_increase"]["hi"]) for a in evidence["arms"]] == [
        ("r=0.1 drop", pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.1)),
        ("r=0.2 drop", pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.2))]
    assert all(a["speedup"]["lo"] > 1.5 and len(a["times_s"]) == 6 for a in evidence["arms"])
    assert len(evidence["reference_s"]) == 6
    # 3 prompts of 5 words: 12 scored tokens at -1.0 each on the r = 0 server.
    assert evidence["reference_nll"] == {"nats_per_token": 1.0, "tokens": 12}
    assert "chosen: r=0.1 drop: the largest setting whose loss bound 0.1 is within 0.15 " \
           "nats/token and whose TTFT speed-up" in " ".join(printed.out.split())
    assert main(["validate", str(target)]) == 0


def test_servers_launched_side_by_side_wait_out_the_last_ones_poll(setup, monkeypatch, capsys):
    """Side by side, every round on another launched server than the last one waits
    WORKER_SETTLE_S first (the last server's vLLM worker polls busily after its step)."""
    from ascend_patch.ab import servers
    from ascend_patch.ab.stats import block_order
    from ascend_patch.harness import server

    monkeypatch.setattr(server, "ManagedServer", LaunchedFake)
    sleeps = []
    monkeypatch.setattr(servers.time, "sleep", sleeps.append)
    code = main(["tune", str(setup / "base.yaml"), "--model", str(setup / "model"),
                 "--max-loss", "0.15", "--ratios", "0.1", "--overflow", "drop", "--launch",
                 "--requests", "2", "--concurrency", "2", "--repeats", "6", "--warmup", "0",
                 "--max-tokens", "2", "--num-prompts", "3", "--prompt-len", "5",
                 "--out", str(setup / "out")])
    assert code == 0, capsys.readouterr()
    runs = [i for block in block_order(2, 6, seed=0) for i in block]
    switches = sum(a != b for a, b in zip(runs, runs[1:]))
    assert [t for t in sleeps if t == servers.WORKER_SETTLE_S] == [1.2] * switches
    assert 0 < switches < len(runs) - 1


def test_launch_stops_with_the_servers_reason_when_one_gives_no_prompt_logprobs(
        setup, monkeypatch, capsys):
    from ascend_patch.harness import server

    class NoEcho(LaunchedFake):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.fake = FakeOpenAI(step_s=0.001, prompt_logprob=None)
            self.base_url = self.fake.url

    monkeypatch.setattr(server, "ManagedServer", NoEcho)
    code = main(["tune", str(setup / "base.yaml"), "--model", str(setup / "model"),
                 "--max-loss", "0.15", "--ratios", "0.1", "--overflow", "drop", "--launch",
                 "--one-at-a-time", "--requests", "1", "--repeats", "1", "--warmup", "0",
                 "--num-prompts", "1", "--prompt-len", "3", "--out", str(setup / "out")])
    assert code == 1
    assert "r=0: no prompt log-probabilities" in " ".join(capsys.readouterr().err.split())
