"""configs/prod.yaml gives DeepSeek-V3 exactly one profile per vLLM line, and the vllm-ascend
ones (W8A8 on A3 EP16 prefill, one per release) comment every option they set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.version import Version

from ascend_patch.core import profiles
from ascend_patch.core.config import load_config
from ascend_patch.core.profiles import ModelInfo, select
from ascend_patch.core.versions import InstalledVllm

PROD = Path(__file__).resolve().parents[2] / "configs" / "prod.yaml"
R1 = ModelInfo("vllm-ascend/DeepSeek-R1-W8A8", ("DeepseekV3ForCausalLM",))
ASCEND_PROFILES = {"0.23": "deepseek-v3-a3-ep16-prefill-0.23",
                   "0.18": "deepseek-v3-a3-ep16-prefill-0.18",
                   "0.13": "deepseek-v3-a3-ep16-prefill-0.13"}


@pytest.mark.parametrize(
    ("vllm", "profile", "min_tokens"),
    [("0.23.0", ASCEND_PROFILES["0.23"], 4096), ("0.18.0", ASCEND_PROFILES["0.18"], 4096),
     ("0.13.0", ASCEND_PROFILES["0.13"], 4096), ("0.32.0", "deepseek-v3-ep16-prefill", 2048),
     ("0.33.0", "deepseek-v3-ep16-prefill", 2048), ("0.34.0", "deepseek-v3-ep16-prefill", 2048)],
)
def test_deepseek_v3_profile_per_line(monkeypatch, vllm, profile, min_tokens):
    monkeypatch.setattr(profiles, "installed_vllm", lambda: InstalledVllm("vllm", Version(vllm)))
    config = load_config(PROD)
    chosen = select(config, R1, None)
    assert chosen == profile  # select() raises when two profiles match
    options = config.with_profile(chosen).patch("moe").options
    assert options.drop_token_ratio == 0.02 and options.min_tokens == min_tokens
    # Planning a line from elsewhere (`plan --vllm-line`) chooses the same profile.
    monkeypatch.setattr(profiles, "installed_vllm", lambda: None)
    assert select(config, R1, None, line=vllm.rsplit(".", 1)[0]) == profile


@pytest.mark.parametrize("name", sorted(ASCEND_PROFILES.values()))
def test_ascend_profiles_set_and_comment_every_option(name):
    """Every option of moe.capacity is written out, each under its own comment."""
    from ascend_patch.impls.moe.options import CapacityOptions

    lines = PROD.read_text().splitlines()
    start = lines.index(f"  {name}:")
    end = next((i for i in range(start + 1, len(lines))
                if re.match(r"  [a-z0-9]", lines[i])), len(lines))
    block = lines[start:end]
    options_at = block.index("        options:")
    written = {}
    for index in range(options_at + 1, len(block)):
        found = re.match(r"          ([a-z_0-9]+):", block[index])
        if found:
            written[found.group(1)] = block[index - 1].strip()
    assert set(written) == set(CapacityOptions.model_fields)
    # Each option line follows a comment (or another option sharing the comment above it).
    for option, above in written.items():
        assert above.startswith("#") or re.match(r"[a-z_0-9]+: ", above), option
