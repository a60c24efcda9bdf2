"""Reading config files: every bad input is one clear error naming file, line and key."""

import pytest

from ascend_patch.core.config import load_config
from ascend_patch.core.errors import ConfigError
from ascend_patch.core.source import MAX_FILE_BYTES, MAX_NODES


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

    def deny(self):
        raise PermissionError(13, "Permission denied")

    # Tests run as root, who reads any file whatever its mode: make the read itself fail.
    monkeypatch.setattr(type(path), "read_bytes", deny)
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
    assert f"{path}:3: other: keys must be plain strings (no merge keys)" in error_of(path)
