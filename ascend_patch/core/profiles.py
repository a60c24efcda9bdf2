"""Choosing a config's profile for the model vLLM is about to serve.

The model is known only once vLLM builds its configuration, after plugins were loaded, so the
first process watches `VllmConfig.__post_init__`, chooses there from the served model, and
passes its choice to its children through the environment (they are started later and
inherit it).

Not every `ModelConfig` is a served model: speculative decoding builds one for its draft
(`SpeculativeConfig` passes `runner="draft"`; DeepSeek MTP's has architecture
`DeepSeekMTPModel`), and `VllmConfig.with_hf_config` makes sub-model views. Watching
`VllmConfig` (what vLLM builds a model from) and reading its `model_config` sees only the
served one; drafts live in `speculative_config` and views are marked `is_submodel_config`.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ascend_patch.core.config import LoadedConfig, Profile
from ascend_patch.core.errors import ConfigError, PatchError
from ascend_patch.core.imports import WATCHER
from ascend_patch.core.session import SESSION
from ascend_patch.core.targets import parse_target, resolve
from ascend_patch.core.versions import installed_vllm, lines_admitted, version_matches

MODEL_CONFIG_HOOK = parse_target("vllm.config.vllm:VllmConfig.__post_init__")
# (owner, attribute, original) of the installed hook, for unwatch_model_config().
_installed: list[tuple[object, str, object]] = []


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architectures: tuple[str, ...]

    @classmethod
    def from_name_or_path(cls, text: str, shown: str = "--model") -> ModelInfo:
        """From a model directory (reads config.json) or a bare name (no architectures).

        A config.json that cannot be read or has no usable `architectures` is a ConfigError
        naming `shown` (the argument it came from) and the file.
        """
        config = Path(text) / "config.json"
        architectures: tuple[str, ...] = ()
        if config.is_file():
            data = read_json_object(config, f"{shown} {text}")
            found = data.get("architectures")
            if found is not None and not (
                isinstance(found, list) and all(isinstance(a, str) for a in found)
            ):
                raise ConfigError.single(f"{shown} {text}: {config}", None, "architectures",
                                         f"must be a list of names, not {found!r:.80}")
            architectures = tuple(found or ())
        return cls(text, architectures)


def read_json_object(path: Path, shown: str) -> dict:
    """A model directory's JSON file as a dict; a ConfigError naming `shown` (the argument it
    came from) and the file when it cannot be read or is not a JSON object."""
    where = f"{shown}: {path}"

    def bad(line: int | None, message: str) -> ConfigError:
        return ConfigError.single(where, line, "", message)

    try:
        data = json.loads(path.read_bytes()[: 16 << 20])
    except OSError as exc:
        raise bad(None, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise bad(None, f"not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise bad(exc.lineno, f"invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise bad(None, "invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise bad(None, "must be a JSON object")
    return data


def served_model(vllm_config) -> ModelInfo | None:
    """The model a VllmConfig serves; None when it serves none of its own: no model config,
    a sub-model view (`with_hf_config`), or a speculative-decoding draft."""
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None or getattr(model_config, "is_submodel_config", False):
        return None
    runner = (getattr(model_config, "runner", None), getattr(model_config, "runner_type", None))
    if "draft" in runner:
        return None
    return ModelInfo(str(model_config.model), tuple(model_config.architectures or ()))


def matches(profile: Profile, model: ModelInfo, line: str | None = None) -> bool:
    """Whether `profile` matches `model` served by the installed vLLM, or, given `line`, by
    that vLLM line (what `plan --vllm-line` plans for)."""
    match = profile.spec.match
    if match is None:
        return False
    if match.architectures and not set(match.architectures) & set(model.architectures):
        return False
    if match.model is not None:
        candidates = {model.name, model.name.rstrip("/").rsplit("/", 1)[-1]}
        if not any(fnmatch.fnmatchcase(c, match.model) for c in candidates):
            return False
    if match.vllm is not None and line is not None:
        return line in lines_admitted(match.vllm)
    if match.vllm is not None:
        vllm = installed_vllm()
        if vllm is None or not version_matches(vllm.version, match.vllm):
            return False
    return True


def _describe(model: ModelInfo) -> str:
    return f"model {model.name!r} (architectures: {', '.join(model.architectures) or 'unknown'})"


def select(config: LoadedConfig, model: ModelInfo, pinned: str | None,
           line: str | None = None) -> str | None:
    """The profile to use for `model` (served by the installed vLLM, or by vLLM `line`); None
    for the base patches. Raises on conflicts."""
    if pinned is not None:
        profile = config.profiles[pinned]
        if profile.spec.match is not None and not profile.spec.allow_unmatched and not matches(
                profile, model, line):
            raise ConfigError.single(
                profile.file, profile.line, f"profiles.{pinned}",
                f"pinned by ASCEND_PATCH_PROFILE but does not match {_describe(model)}; its match is "
                f"{profile.spec.match.model_dump(exclude_defaults=True)}. Set 'allow_unmatched: true' "
                "in the profile to allow this",
            )
        return pinned
    chosen = [name for name, profile in config.profiles.items() if matches(profile, model, line)]
    if len(chosen) > 1:
        first = config.profiles[chosen[0]]
        raise ConfigError.single(
            first.file, first.line, "profiles",
            f"{_describe(model)} matches several profiles: {', '.join(chosen)}; narrow their "
            "'match' or pin one with ASCEND_PATCH_PROFILE",
        )
    return chosen[0] if chosen else None


def watch_model_config(callback: Callable[[ModelInfo], None] | None,
                       on_config: Callable[[object], None] | None = None) -> None:
    """Call `callback` with the served model each time vLLM builds a VllmConfig, before the
    rest of it is set up (and so before any model is built from it); then `on_config` with
    the VllmConfig itself."""

    def install(_module=None) -> None:
        try:
            resolved = resolve(MODEL_CONFIG_HOOK, import_module=False)
        except LookupError as exc:  # a vLLM without VllmConfig.__post_init__
            raise PatchError(f"cannot choose a profile per model: {MODEL_CONFIG_HOOK}: {exc}; "
                             "pin one with ASCEND_PATCH_PROFILE") from None
        original = resolved.function
        if getattr(original, "__ascend_patch_model_hook__", False):
            return

        def __post_init__(self, *args, **kwargs):
            model = served_model(self)
            if model is not None and callback is not None:
                callback(model)
            if on_config is not None:
                on_config(self)
            original(self, *args, **kwargs)

        __post_init__.__wrapped__ = original
        __post_init__.__ascend_patch_model_hook__ = True
        setattr(resolved.owner, resolved.attr, __post_init__)
        _installed.append((resolved.owner, resolved.attr, resolved.raw))
        SESSION.on_revert("profiles.model_hook", unwatch_model_config)

    if MODEL_CONFIG_HOOK.module in sys.modules:
        install()
    else:
        WATCHER.watch(MODEL_CONFIG_HOOK.module, install)


def unwatch_model_config() -> None:
    while _installed:
        owner, attr, original = _installed.pop()
        setattr(owner, attr, original)
