"""Every subcommand's bad arguments exit 2 with a message naming the argument, before any
engine starts or anything is written."""

import json

import pytest

from ascend_patch.ab import offline
from ascend_patch.ab.common import Arm
from ascend_patch.ab.engine import EngineProcess
from ascend_patch.cli.main import main
from ascend_patch.harness.server import ManagedServer

MOE = """
version: 1
patches:
  - name: moe
    impl: moe.capacity
    options: {min_tokens: 0}
"""


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if an A/B arm would start an engine."""
    def refuse(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(EngineProcess, "start", refuse)
    monkeypatch.setattr(ManagedServer, "start", refuse)


def usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(("args", "message"), [
    (["--ratios", "abc"], "argument --ratios: 'abc' is not a number"),
    (["--ratios", "0,0.7"], "argument --ratios: '0.7' is out of range (drop_token_ratio is in [0, 0.5])"),
    (["--ratios", "0,nan"], "argument --ratios: 'nan' is out of range (drop_token_ratio is in [0, 0.5])"),
    (["--ratios", "0,,0.1"], "argument --ratios: '0,,0.1': give drop ratios separated by commas, "
                             "e.g. 0,0.02,0.05"),
    (["--num-prompts", "0"], "argument --num-prompts: 0 is out of range (1 to 10000)"),
    (["--repeats", "0"], "argument --repeats: 0 is out of range (1 to 1000)"),
    (["--repeats", "many"], "argument --repeats: 'many' is not an integer"),
    (["--warmup", "-1"], "argument --warmup: -1 is out of range (0 to 100)"),
    (["--prompt-len", "x"], "argument --prompt-len: 'x' is not an integer"),
    (["--max-tokens", "-3"], "argument --max-tokens: -3 is out of range (1 to 100000)"),
    (["--tensor-parallel-size", "0"], "argument --tensor-parallel-size: 0 is out of range (1 to 64)"),
    (["--timeout", "nan"], "argument --timeout: 'nan' is out of range (more than 0, at most a week)"),
    (["--timeout", "-1"], "argument --timeout: '-1' is out of range (more than 0, at most a week)"),
    (["--seed", "-1"], "argument --seed: -1 is out of range (0 to 4294967295)"),
])
def test_bad_ab_numbers(capsys, no_engine, tmp_path, args, message):
    config = tmp_path / "c.yaml"
    config.write_text(MOE)
    out = tmp_path / "out"
    assert usage_error(capsys, ["ab", str(config), *args, "--out", str(out)]) == (
        f"ascend-patch ab: error: {message}")
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--tokens", "0"], "argument --tokens: 0 is out of range (1 to 1048576)"),
    (["--experts", "10", "--ep-size", "3"], "argument --experts: 10 experts do not split evenly "
                                            "over --ep-size 3"),
    (["--experts", "16", "--ep-size", "4", "--top-k", "9"],
     "argument --top-k: 9 is more than the 8 experts the grouped router can choose among 16"),
    (["--top-k", "65"], "argument --top-k: 65 is out of range (1 to 64)"),
    (["--skews", "0.5"], "argument --skews: '0.5': a max/mean load is a number >= 1"),
    (["--skews", "hot"], "argument --skews: 'hot' is neither a number nor one of balanced, "
                         "moderate, r1"),
    (["--skews", "20"], "argument --skews: 20 is above 16, the largest max/mean load over "
                        "--ep-size 16 ranks"),
    (["--policies", "probs,magic"], "argument --policies: 'magic': policies are probs, position, seed"),
    (["--reps", "0"], "argument --reps: 0 is out of range (1 to 1000)"),
    (["--hidden", "1e9"], "argument --hidden: '1e9' is not an integer"),
    (["--ratios", "0.6"], "argument --ratios: '0.6' is out of range (drop_token_ratio is in [0, 0.5])"),
])
def test_bad_layer_numbers(capsys, tmp_path, args, message):
    out = tmp_path / "out"
    assert usage_error(capsys, ["ab", "--layer", *args, "--out", str(out)]) == (
        f"ascend-patch ab: error: {message}")
    assert not out.exists()


def test_layer_out_must_be_a_folder(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert usage_error(capsys, ["ab", "--layer", "--out", str(tmp_path / "file")]) == (
        f"ascend-patch ab: error: argument --out: {tmp_path / 'file'} exists and is not a folder")


def test_ab_needs_a_config_or_arms_not_both(capsys, no_engine, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(MOE)
    assert usage_error(capsys, ["ab"]) == (
        "ascend-patch ab: error: give a CONFIG (with --ratios), --arms FILE ..., --servers URL ... "
        "or --launch CONFIG ...")
    assert usage_error(capsys, ["ab", str(config), "--arms", str(config)]) == (
        "ascend-patch ab: error: give one of CONFIG (with --ratios), --arms, --servers or --launch, "
        "not CONFIG and --arms")
    assert usage_error(capsys, ["ab", "--arms", str(tmp_path / "nope.yaml")]) == (
        f"ascend-patch ab: error: argument --arms: {tmp_path / 'nope.yaml'} is not a file")
    assert usage_error(capsys, ["ab", "--arms", str(config)]) == (
        "ascend-patch ab: error: argument --arms: give at least two arms to compare (or --stock "
        "and one)")
    assert usage_error(capsys, ["ab", str(config), "--ratios", "0.1"]) == (
        "ascend-patch ab: error: argument --ratios: give at least two arms to compare (or --stock "
        "and one)")
    assert usage_error(capsys, ["ab", str(config), "--model", str(tmp_path)]) == (
        f"ascend-patch ab: error: argument --model: {tmp_path} is not a model directory (no config.json)")
    (tmp_path / "file").write_text("")
    assert usage_error(capsys, ["ab", str(config), "--out", str(tmp_path / "file")]) == (
        f"ascend-patch ab: error: argument --out: {tmp_path / 'file'} exists and is not a folder")


def test_ab_checks_every_arm_before_any_engine(capsys, no_engine, tmp_path, write_config):
    good = write_config(MOE, name="good.yaml")
    bad = write_config(MOE.replace("min_tokens: 0", "min_tokens: -1"), name="bad.yaml")
    out = tmp_path / "out"
    assert main(["ab", "--arms", str(good), str(bad), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"invalid ascend-patch config: {bad}:5: patches[0].options.min_tokens: input should be "
        "greater than or equal to 0")
    assert not out.exists()


def test_ab_ratios_need_a_capacity_patch(capsys, no_engine, tmp_path, write_config):
    config = write_config("version: 1\npatches:\n  - {name: rms, impl: ops.rms_norm}\n")
    assert main(["ab", str(config), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"invalid ascend-patch config: CONFIG: {config} has no moe.capacity patch to vary the drop "
        "ratio of")
    config = write_config(MOE, name="moe.yaml")
    assert main(["ab", str(config), "--patch", "nope", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"invalid ascend-patch config: --patch: {config} has no moe.capacity patch named 'nope' "
        "(have: moe)")
    assert not (tmp_path / "o").exists()


def test_unique_labels_for_arms_of_the_same_file_name(tmp_path):
    arms = offline.unique_labels([Arm("a", tmp_path / "x" / "a.yaml"), Arm("a", tmp_path / "y" / "a.yaml")])
    assert [a.label for a in arms] == ["a", "a#2"]


def test_tiny_model_refuses_a_file_or_a_non_empty_folder(capsys, tmp_path):
    (tmp_path / "file").write_text("keep me")
    assert main(["tiny-model", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ascend-patch tiny-model: error: argument OUT_DIR: {tmp_path / 'file'} exists and is not "
        "a folder")
    assert main(["tiny-model", str(tmp_path / "file"), "--force"]) == 2  # a file, never replaced
    assert capsys.readouterr().err.strip().endswith("file exists and is not a folder")
    assert (tmp_path / "file").read_text() == "keep me"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["tiny-model", str(tmp_path / "full")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ascend-patch tiny-model: error: argument OUT_DIR: {tmp_path / 'full'} is not empty; pass "
        "--force to write the model files into it")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["notes.txt"]
    assert main(["tiny-model", str(tmp_path / "full"), "--force"]) == 0
    assert (tmp_path / "full" / "config.json").is_file() and (tmp_path / "full" / "notes.txt").is_file()
    (tmp_path / "empty").mkdir()
    assert main(["tiny-model", str(tmp_path / "empty")]) == 0
    assert main(["tiny-model", str(tmp_path / "new" / "dir")]) == 0


@pytest.mark.parametrize(("content", "message"), [
    ('{"architectures": ["DeepseekV3ForCausalLM"],', ":2: invalid JSON: Expecting property name "
                                                     "enclosed in double quotes"),
    ("[1, 2]", ": must be a JSON object"),
    ('{"architectures": "DeepseekV3ForCausalLM"}', ": architectures: must be a list of names, "
                                                   "not 'DeepseekV3ForCausalLM'"),
    (b'{"name": "caf\xe9"}', ": not UTF-8 text (invalid continuation byte)"),
])
def test_plan_model_with_a_broken_config_json(capsys, tmp_path, write_config, content, message):
    model = tmp_path / "model"
    model.mkdir()
    path = model / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else (content + "\n").encode())
    config = write_config(MOE)
    assert main(["plan", "--no-check", "--model", str(model), str(config)]) == 2
    where = f"--model {model}: {path}"
    assert capsys.readouterr().err.strip() == f"invalid ascend-patch config: {where}{message}"


def test_source_must_hold_the_package_it_names(capsys, tmp_path, write_config):
    """A copy of the package under another folder name is neither the package nor a folder
    holding it: a usage error naming --source, not the static reader's traceback."""
    renamed = tmp_path / "renamed"
    (renamed / "sub").mkdir(parents=True)
    (renamed / "__init__.py").write_text("")
    config = write_config(MOE)
    argv = ["validate", "--platform", "ascend", "--source", f"vllm_ascend={renamed}", str(config)]
    assert usage_error(capsys, argv) == (
        f"ascend-patch validate: error: argument --source: 'vllm_ascend={renamed}': "
        f"{renamed} is neither the package vllm_ascend nor a folder containing it")
