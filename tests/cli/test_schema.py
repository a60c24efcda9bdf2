"""`ascend-patch schema`: the editor schema is the loader's, shipped, and the configs carry it."""

import json
from pathlib import Path

import jsonschema
import pytest

from ascend_patch.cli.main import main
from ascend_patch.core.config import load_config
from ascend_patch.core.errors import ConfigError
from ascend_patch.core.schema import MODELINE, config_schema
from ascend_patch.core.source import parse_document, read_document

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
SHIPPED = CONFIG_DIR / "ascend-patch.schema.json"


def validator():
    return jsonschema.Draft202012Validator(json.loads(SHIPPED.read_text()))


def test_the_shipped_schema_is_what_the_command_prints(capsys):
    assert main(["schema"]) == 0
    assert capsys.readouterr().out == SHIPPED.read_text(), (
        "configs/ascend-patch.schema.json is stale: "
        "ascend-patch schema > configs/ascend-patch.schema.json")


def test_the_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(config_schema())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_carries_the_modeline_and_validates(path):
    assert path.read_text().splitlines()[0] == MODELINE
    assert list(validator().iter_errors(read_document(path).data)) == []


GOOD = """
version: 1
patches:
  - name: moe
    impl: moe.capacity
    options: {drop_token_ratio: 0.05, dispatch: all_to_all}
  - name: rms
    impl: ops.rms_norm
profiles:
  ds:
    match: {architectures: [DeepseekV3ForCausalLM]}
    patches:
      moe: {options: {drop_token_ratio: 0.02}}
"""


def errors(text: str) -> list[tuple[str, str]]:
    data = parse_document(text.encode(), "test.yaml").data
    return sorted((".".join(map(str, e.absolute_path)), e.validator)
                  for e in validator().iter_errors(data))


def test_a_good_config_passes():
    assert errors(GOOD) == []


@pytest.mark.parametrize(("old", "new", "expected"), [
    # An unknown key at the top level and in a patch.
    ("version: 1", "version: 1\nvllm_range: '>=0.32'", [("", "additionalProperties")]),
    ("    impl: ops.rms_norm", "    impl: ops.rms_norm\n    enable: false",
     [("patches.1", "additionalProperties")]),
    # moe.capacity's options are checked by type, range, enum and name.
    ("drop_token_ratio: 0.05,", "drop_token_ratio: high,",
     [("patches.0.options.drop_token_ratio", "type")]),
    ("drop_token_ratio: 0.05,", "drop_token_ratio: 0.7,",
     [("patches.0.options.drop_token_ratio", "maximum")]),
    ("dispatch: all_to_all", "dispatch: alltoall", [("patches.0.options.dispatch", "enum")]),
    ("dispatch: all_to_all", "keep_top1: 'yes'", [("patches.0.options.keep_top1", "type")]),
    ("dispatch: all_to_all", "drop_ratio: 0.1", [("patches.0.options", "additionalProperties")]),
    # An implementation without options takes none.
    ("    impl: ops.rms_norm", "    impl: ops.rms_norm\n    options: {eps: 1.0e-6}",
     [("patches.1.options", "additionalProperties")]),
    ("impl: moe.capacity", "impl: moe.capacty", [("patches.0.impl", "anyOf")]),
    ("version: 1", "version: 2", [("version", "const")]),
    ("  ds:", "  'ds v3':", [("profiles", "pattern")]),
])
def test_a_bad_config_is_rejected_where_the_loader_rejects_it(old, new, expected, tmp_path):
    assert GOOD.count(old) == 1
    text = GOOD.replace(old, new)
    assert errors(text) == expected
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)


def test_an_external_implementation_is_left_to_the_loader():
    text = GOOD.replace("impl: ops.rms_norm", "impl: mypkg.impls:RMS\n    options: {eps: 1}")
    assert errors("allow_external_impls: true\n" + text) == []
