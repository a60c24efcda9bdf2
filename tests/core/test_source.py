"""Reading config files: every bad input is one clear error naming file, line and key."""

import pytest

from ascend_patch.core.config import load_config
from ascend_patch.core.errors import ConfigError
from ascend_patch.core.source import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, MAX_PROBLEMS


def error_of(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error_of(path) == f"invalid ascend-patch config: {path}: file not found"


def test_directory_is_refused(tmp_path):
    assert error_of(tmp_path) == f"invalid ascend-patch config: {tmp_path}: not a regular file"


def test_unreadable_file(write_config, monkeypatch):
    path = write_config("version: 1\n")

    def deny(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Tests run as root, who reads any file whatever its mode: make the read itself fail.
    monkeypatch.setattr(type(path), "open", deny)
    assert error_of(path) == f"invalid ascend-patch config: {path}: cannot read file: Permission denied"


def test_invalid_yaml_names_the_line(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: a
            impl: [unclosed
    """)
    assert error_of(path).startswith(f"invalid ascend-patch config: {path}:5: invalid YAML")


def test_python_object_tag_is_refused(write_config):
    path = write_config("""
        version: 1
        patches:
          - name: !!python/object/apply:os.system ["echo pwned"]
            impl: ops.rms_norm
    """)
    message = error_of(path)
    assert f"{path}:3: patches[0].name: tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed" in message


def test_custom_scalar_tag_is_refused(write_config):
    path = write_config("""
        version: 1
        description: !secret abc
    """)
    assert f"{path}:2: description: tag '!secret' is not allowed" in error_of(path)


def test_alias_bomb_is_refused(write_config):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    path = write_config("\n".join(lines) + "\n")
    assert f"expands to more than {MAX_NODES} values" in error_of(path)


def test_small_aliases_are_fine(write_config):
    path = write_config("""
        version: 1
        description: &d shared text
        patches: []
    """)
    assert load_config(path).description == "shared text"


def test_file_over_one_mib_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("version: 1\n" + "#" * MAX_FILE_BYTES)
    size = path.stat().st_size
    assert error_of(path) == (
        f"invalid ascend-patch config: {path}: file is {size} bytes; configs are limited to "
        f"{MAX_FILE_BYTES}"
    )


def test_duplicate_key_is_refused(write_config):
    path = write_config("""
        version: 1
        patches: []
        patches: []
    """)
    assert error_of(path) == f"invalid ascend-patch config: {path}:3: patches: duplicate key"


def test_empty_file(write_config):
    path = write_config("\n")
    assert error_of(path) == f"invalid ascend-patch config: {path}: the file is empty"


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("description: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8 text" in error_of(path)


def test_merge_keys_are_refused(write_config):
    path = write_config("""
        base: &b {x: 1}
        other:
          <<: *b
    """)
    assert error_of(path) == (
        f"invalid ascend-patch config: {path}:3: other: merge keys ('<<') are not supported; "
        "write the keys out")


# -- hostile and surprising YAML: a clear message naming file, line and key, or the value
# -- as written; never a traceback, never a hang.


def test_deep_nesting_is_refused_without_recursion(write_config):
    # 500 levels: PyYAML's composer would raise RecursionError (libyaml stops at 1000).
    path = write_config("version: 1\ndescription: " + "[" * 500 + "]" * 500 + "\n")
    assert error_of(path) == (
        f"invalid ascend-patch config: {path}:2: description[0][0]: nested more than "
        f"{MAX_DEPTH} levels deep")


def test_nesting_through_aliases_counts_too(write_config):
    path = write_config("a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n")
    assert error_of(path) == (
        f"invalid ascend-patch config: {path}:2: b[0][0]: nested more than {MAX_DEPTH} levels deep")


@pytest.mark.parametrize(("text", "where"), [
    ("version: 1\npatches: &p [*p]\n", "2: patches[0]"),
    ("version: 1\nprofiles: &p {x: *p}\n", "2: profiles.x"),
])
def test_recursive_alias_is_refused(write_config, text, where):
    path = write_config(text)
    assert error_of(path) == (
        f"invalid ascend-patch config: {path}:{where}: recursive alias *p: it refers to a node "
        "that contains it")


def test_undefined_alias(write_config):
    path = write_config("version: 1\ndescription: *nope\n")
    assert error_of(path) == f"invalid ascend-patch config: {path}:2: description: undefined alias *nope"


def test_invalid_timestamp_is_read_as_written(write_config):
    # YAML 1.1 resolves 2024-13-45 as a timestamp and PyYAML's constructor raises ValueError.
    path = write_config("version: 1\ndescription: 2024-13-45\n")
    assert load_config(path).description == "2024-13-45"


def test_timestamp_tag_is_refused(write_config):
    path = write_config("version: 1\ndescription: !!timestamp 2024-13-45\n")
    assert error_of(path) == (
        f"invalid ascend-patch config: {path}:2: description: tag 'tag:yaml.org,2002:timestamp' "
        "is not allowed")


def test_huge_integer_is_a_clear_error(write_config):
    path = write_config("version: 1\npatches:\n  - name: moe\n    impl: moe.capacity\n"
                        "    options: {min_tokens: " + "9" * 5000 + "}\n")
    assert error_of(path) == (
        f"invalid ascend-patch config: {path}:5: patches[0].options.min_tokens: "
        "'9999999999999999999999999999999999999999'... is not a valid !!int "
        "(5000 digits; at most 4300)")


def test_big_integer_within_limits_is_read_as_written(write_config):
    path = write_config("version: 1\npatches:\n  - name: moe\n    impl: moe.capacity\n"
                        "    options: {min_tokens: " + "9" * 40 + "}\n")
    assert load_config(path).patch("moe").options.min_tokens == int("9" * 40)


@pytest.mark.parametrize(("value", "message"), [
    ("!!int abc", "'abc' is not a valid !!int"),
    ("!!float x1", "'x1' is not a valid !!float"),
    ("!!bool yes", "'yes' is not a valid !!bool (write true or false)"),
    ("!!null x", "'x' is not a valid !!null"),
    ("!!binary aGk=", "tag 'tag:yaml.org,2002:binary' is not allowed"),
    ("!!set {a}", "tag 'tag:yaml.org,2002:set' is not allowed"),
    ("!!omap [a: 1]", "tag 'tag:yaml.org,2002:omap' is not allowed"),
    ("!local x", "tag '!local' is not allowed"),
])
def test_explicit_tags_with_bad_values(write_config, value, message):
    path = write_config(f"version: 1\ndescription: {value}\n")
    assert error_of(path) == f"invalid ascend-patch config: {path}:2: description: {message}"


def test_explicit_core_tags_with_good_values(write_config):
    path = write_config("version: !!int '1'\ndescription: !!str 12\n")
    config = load_config(path)
    assert config.description == "12"


def test_tags_on_keys(write_config):
    path = write_config("version: 1\n!!str description: text\n!!int 3: x\n!odd key: y\n? [a, b]\n: z\n")
    assert error_of(path) == "\n".join([
        f"invalid ascend-patch config ({3} problems):",
        f"  {path}:3: key 3 must be a string",
        f"  {path}:4: tag '!odd' is not allowed",
        f"  {path}:5: keys must be plain strings, not mappings or lists",
    ])


def test_symlink_loop_config_path(tmp_path):
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    path = tmp_path / "a.yaml"
    assert error_of(path) == (
        f"invalid ascend-patch config: {path}: cannot read file: Symlink loop from '{path}'")


def test_symlink_loop_in_extends(write_config, tmp_path):
    (tmp_path / "loop1.yaml").symlink_to(tmp_path / "loop2.yaml")
    (tmp_path / "loop2.yaml").symlink_to(tmp_path / "loop1.yaml")
    child = write_config("version: 1\nextends: loop1.yaml\n")
    assert error_of(child) == (
        f"invalid ascend-patch config: {child}:2: extends: base config {tmp_path / 'loop1.yaml'}: "
        "Too many levels of symbolic links")


def test_nul_byte_names_its_line(tmp_path):
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"version: 1\ndescription: a\x00b\n")
    assert error_of(path) == (
        f"invalid ascend-patch config: {path}:2: contains the control character U+0000 (NUL), "
        "which YAML does not allow")


def test_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\n\ndescription: caf\xe9\n")
    assert error_of(path) == (
        f"invalid ascend-patch config: {path}:3: not UTF-8 text (byte 0xe9: invalid continuation byte)")


@pytest.mark.parametrize(("text", "expected"), [
    ("0256", 256),        # YAML 1.1: octal 174
    ("0o17", 15),
    ("0x1F", 31),
    ("1:30", "1:30"),     # YAML 1.1: sexagesimal 90
    ("1_000", "1_000"),   # YAML 1.1: 1000
    ("1e3", 1000.0),      # YAML 1.1 (PyYAML): the string '1e3'
    ("yes", "yes"), ("on", "on"), ("off", "off"), ("no", "no"), ("y", "y"),
    ("true", True), ("False", False), ("~", None), (".inf", float("inf")),
])
def test_yaml_1_2_scalars(write_config, text, expected):
    from ascend_patch.core.source import parse_document

    assert parse_document(f"value: {text}\n".encode(), "x.yaml").data == {"value": expected}


def test_yaml_1_1_booleans_in_the_schema_are_refused_clearly(write_config):
    path = write_config("""
        version: 1
        allow_external_impls: on
        patches:
          - name: rms
            impl: ops.rms_norm
            enabled: no
    """)
    assert error_of(path) == "\n".join([
        "invalid ascend-patch config (2 problems):",
        f"  {path}:2: allow_external_impls: must be true or false, not the string 'on'",
        f"  {path}:6: patches[0].enabled: must be true or false, not the string 'no'",
    ])


@pytest.mark.parametrize("value", ["true", "1.0", "'1'"])
def test_version_must_be_the_integer_1(write_config, value):
    path = write_config(f"version: {value}\n")
    shown = {"true": "True", "1.0": "1.0", "'1'": "'1'"}[value]
    assert error_of(path) == (
        f"invalid ascend-patch config: {path}:1: version: value error, must be the integer 1, "
        f"not {shown}")


def test_every_problem_of_a_file_at_once(write_config):
    path = write_config("""
        version: 1
        description: !!int x
        description: again
        patches:
          - name: a
            impl: ops.rms_norm
            on_error: !secret fail
    """)
    assert error_of(path) == "\n".join([
        "invalid ascend-patch config (3 problems):",
        f"  {path}:2: description: 'x' is not a valid !!int",
        f"  {path}:3: description: duplicate key",
        f"  {path}:7: patches[0].on_error: tag '!secret' is not allowed",
    ])


def test_every_schema_problem_of_a_file_at_once(write_config):
    path = write_config("""
        version: 1
        colour: red
        patches:
          - name: a
            impl: ops.rms_norm
            enabled: 3
          - nmae: b
    """)
    assert error_of(path) == "\n".join([
        "invalid ascend-patch config (5 problems):",
        f"  {path}:2: colour: unknown key",
        f"  {path}:6: patches[0].enabled: input should be a valid boolean",
        f"  {path}:7: patches[1].impl: required key is missing",
        f"  {path}:7: patches[1].name: required key is missing",
        f"  {path}:7: patches[1].nmae: unknown key (did you mean 'name'?)",
    ])


def test_second_document_is_refused(write_config):
    path = write_config("version: 1\n---\nversion: 1\n")
    assert error_of(path) == (
        f"invalid ascend-patch config: {path}:2: a config file holds one YAML document; found a "
        "second one ('---')")


def test_many_problems_stop_at_a_bound(write_config):
    path = write_config("version: 1\n" + "".join(f"k{i}: !!int x\n" for i in range(500)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == MAX_PROBLEMS


def test_one_mib_file_is_refused_quickly(tmp_path):
    import time

    path = tmp_path / "big.yaml"
    path.write_text("version: 1\nitems: [" + "1, " * (MAX_FILE_BYTES // 3) + "]\n")
    started = time.perf_counter()
    message = error_of(path)
    elapsed = time.perf_counter() - started
    assert message.endswith(f"configs are limited to {MAX_FILE_BYTES}")
    assert elapsed < 1.0


@pytest.mark.parametrize("body", [
    "[" * (MAX_FILE_BYTES - 100),                                  # nesting
    "a: [" + "1, " * ((MAX_FILE_BYTES - 100) // 3) + "]\n",       # values
    "a: " + "x" * (MAX_FILE_BYTES - 100) + "\n",                  # one long string
])
def test_just_under_one_mib_is_read_or_refused_quickly(tmp_path, body):
    import time

    path = tmp_path / "big.yaml"
    path.write_text(body)
    started = time.perf_counter()
    with pytest.raises(ConfigError):
        load_config(path)
    assert time.perf_counter() - started < 1.0
