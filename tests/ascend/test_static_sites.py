"""The ascend site sets of moe.capacity against the real vllm-ascend sources, read only:
0.23.0.post1 for the vLLM 0.23 line, 0.18.0 for 0.18, 0.13.0 for 0.13.

Nothing from vllm-ascend is imported here (it needs torch_npu): every site and relied-on
interface is resolved with ascend_patch.checks.static_targets, as `ascend-patch validate
--platform ascend --source vllm_ascend=DIR` does, and must have the declared signature.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from ascend_patch.core import catalog
from ascend_patch.core.targets import parse_target
from tests.ascend import harness

# Every release's source is read, whichever vLLM is installed: the primary environment runs it.
pytestmark = pytest.mark.once

REPO = Path(__file__).resolve().parents[2]
static_targets = pytest.importorskip(
    "ascend_patch.checks.static_targets", reason="static target resolution not available yet"
)

# The lines whose vllm-ascend release moe.capacity has sites for.
LINES = ("0.23", "0.18", "0.13")


def ascend_entries(line):
    site_set = catalog.lookup("moe.capacity").site_set(line, "ascend")
    assert site_set is not None and site_set.sites, "moe.capacity declares no ascend site set"
    return list(site_set.sites) + list(site_set.relies_on)


ENTRIES = [(line, e) for line in LINES for e in ascend_entries(line)]


def hints(line):
    """What validate decides for the line (ascend_patch/cli/main.py): vllm-ascend picks
    definitions with vllm_version_is("X.Y.Z")."""
    return {f'vllm_version_is("{v}")': v.startswith(f"{line}.")
            for v in ("0.13.0", "0.18.0", "0.23.0", "0.27.1", "0.32.0")}


@pytest.fixture(scope="module", params=LINES)
def line(request):
    return request.param


def roots_of(line):
    source = harness.require_source(harness.RELEASES[line])
    return static_targets.SourceRoots({"vllm_ascend": source}, branch_hints=hints(line))


def test_everything_the_ascend_site_set_names_is_vllm_ascend_source():
    """So that validate needs no other source tree than vllm-ascend's."""
    assert {parse_target(e.target).module.split(".")[0] for _, e in ENTRIES} == {"vllm_ascend"}


@pytest.mark.parametrize(("release_line", "entry"), ENTRIES,
                         ids=[f"{line}-{e.target.split(':')[1]}" for line, e in ENTRIES])
def test_resolves_with_the_declared_signature(release_line, entry):
    found = roots_of(release_line).resolve(parse_target(entry.target))
    if entry.signature is not None:
        assert found.signature == entry.signature, f"{entry.target} at {found.file}:{found.line}"


def npu_modules() -> set[str]:
    return {m for m in sys.modules if m.split(".")[0] in ("vllm_ascend", "torch_npu")}


def test_factories_load_without_vllm_ascend(line):
    """The loader imports every factory (and so does validate on the planned stack): that
    must not need torch_npu or vllm-ascend."""
    before = npu_modules()
    site_set = catalog.lookup("moe.capacity").site_set(line, "ascend")
    for site in site_set.sites:
        assert callable(catalog.load_callable(site.factory))
    assert npu_modules() == before


def test_validate_prod_config_for_ascend_reads_only_the_source(capsys, line):
    source = harness.require_source(harness.RELEASES[line])
    from ascend_patch.cli.main import main

    before = npu_modules()
    assert f"vllm_ascend={source}" in harness.stack_source_args(line)
    code = main(["validate", str(REPO / "configs" / "prod.yaml"), "--platform", "ascend",
                 "--vllm-line", line, *harness.stack_source_args(line)])
    assert code == 0, capsys.readouterr().err
    assert npu_modules() == before


def dispatch_kwarg_names(source: Path) -> set[str]:
    """Every keyword TokenDispatcherWithMC2.get_dispatch_mc2_kwargs can hand to
    npu_moe_distribute_dispatch[_v2]: dict-literal keys and `kwargs[...] =` subscripts."""
    path = source / "vllm_ascend" / "ops" / "fused_moe" / "token_dispatcher.py"
    tree = ast.parse(path.read_text())
    (function,) = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                   and node.name == "get_dispatch_mc2_kwargs"]
    names = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Dict):
            names |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            if isinstance(node.slice, ast.Constant):
                names.add(node.slice.value)
    return names


def test_mc2_dispatch_has_no_per_row_mask(line):
    """The evidence for keeping MC2 steps whole (ascend_0_23.py): the dispatch op gets every
    token's k expert ids and one per-token mask, nothing that could switch off one row. A
    new keyword here means that decision must be read again."""
    names = dispatch_kwarg_names(harness.require_source(harness.RELEASES[line]))
    common = {
        "x", "expert_ids", "expert_shard_type", "shared_expert_rank_num", "moe_expert_num",
        "global_bs", "expert_token_nums_type", "scales", "quant_mode", "group_ep",
        "ep_world_size", "ep_rank_id", "group_tp", "tp_world_size", "tp_rank_id",
        "expert_scales",
    }
    # 0.13.0 has not even the per-token mask yet.
    newer = set() if line == "0.13" else {"x_active_mask", "y_dtype", "comm_alg"}
    assert names == common | newer


@pytest.fixture
def mutable_source(tmp_path, line):
    """A copy of vllm-ascend's Python sources that a test may change."""
    import shutil

    source = harness.require_source(harness.RELEASES[line])
    copy = tmp_path / "vllm-ascend"
    shutil.copytree(source / "vllm_ascend", copy / "vllm_ascend",
                    ignore=shutil.ignore_patterns("*.so", "*.cpp", "*.h", "__pycache__"))
    return copy


# 0.13.0 has no build_token_dispatch_input: its drop site is the all-to-all dispatcher's
# token_dispatch (the third `pertoken_scale` parameter in token_dispatcher.py).
_TOKEN_DISPATCH_END = "                       pertoken_scale: Optional[torch.Tensor] = None):"
CHANGED_SIGNATURE_0_13 = (
    "ops/fused_moe/token_dispatcher.py", _TOKEN_DISPATCH_END,
    _TOKEN_DISPATCH_END.replace("None):", "None,\n                       scale=None):"),
    "target vllm_ascend.ops.fused_moe.token_dispatcher:TokenDispatcherWithMC2.token_dispatch has "
    "signature (self, hidden_states, topk_weights, topk_ids, expert_map=…, "
    "global_redundant_expert_num=…, mc2_mask=…, apply_router_weight_on_input=…, with_quant=…, "
    "dynamic_eplb=…, pertoken_scale=…, scale=…)")

# 0.13.0's quantized path: its wrapper (quantization/quant_config.py:551-564) and the MLP its
# fused_experts calls by keyword (ops/fused_moe/moe_mlp.py:314-330, imported into CM:28).
QUANTIZED_0_13 = {
    True: ("quantization/quant_config.py",
           "        global_redundant_expert_num=0,\n        **kwargs,\n    ) -> torch.Tensor:",
           "        global_redundant_expert_num=0,\n        tid2eid=None,\n        **kwargs,\n"
           "    ) -> torch.Tensor:",
           "vllm_ascend.quantization.quant_config:AscendFusedMoEMethod.apply"),
    False: ("ops/fused_moe/moe_mlp.py",
            "                      dynamic_eplb: bool = False) -> torch.Tensor:\n"
            "    if with_quant:",
            "                      dynamic_eplb: bool = False,\n                      stream=None)"
            " -> torch.Tensor:\n    if with_quant:",
            "vllm_ascend.ops.fused_moe.moe_comm_method:unified_apply_mlp has signature ("),
}


@pytest.mark.parametrize(
    ("path", "old", "new", "message"),
    [
        # A patched site whose signature changed upstream.
        ("ops/fused_moe/moe_runtime_args.py",
         "    topk_ids: torch.Tensor | None = None,\n) -> MoETokenDispatchInput:",
         "    topk_ids: torch.Tensor | None = None,\n    scale=None,\n) -> MoETokenDispatchInput:",
         "target vllm_ascend.ops.fused_moe.moe_runtime_args:build_token_dispatch_input has "
         "signature (*, fused_experts_input, topk_ids=…, scale=…), but moe.capacity expects "
         "(*, fused_experts_input, topk_ids=…)"),
        # A relied-on interface renamed upstream.
        ("ascend_forward_context.py", "def select_moe_comm_method(",
         "def choose_moe_comm_method(",
         "relies on vllm_ascend.ascend_forward_context:select_moe_comm_method"),
        # The quantized path: the wrapper every quantized scheme is reached through.
        ("quantization/method_adapters.py",
         "        mc2_mask: torch.Tensor | None = None,\n    ) -> torch.Tensor:\n"
         "        return self.quant_method.apply(",
         "        mc2_mask: torch.Tensor | None = None,\n        tid2eid=None,\n"
         "    ) -> torch.Tensor:\n        return self.quant_method.apply(",
         "vllm_ascend.quantization.method_adapters:AscendFusedMoEMethod.apply"),
        # The zero-row guard's site.
        ("ops/fused_moe/moe_comm_method.py",
         "    def _apply_mlp(self, mlp_compute_input: MoEMlpComputeInput)",
         "    def _apply_mlp(self, mlp_compute_input: MoEMlpComputeInput, stream=None)",
         "MoECommMethod._apply_mlp has signature (self, mlp_compute_input, stream=…)"),
    ],
    ids=["changed-signature", "renamed-interface", "quantized-wrapper-signature",
         "quantized-mlp-site-signature"],
)
def test_validate_fails_on_a_mutated_copy(mutable_source, line, capsys, path, old, new,
                                          message):
    from ascend_patch.cli.main import main

    if line == "0.13" and path.endswith("moe_runtime_args.py"):
        path, old, new, message = CHANGED_SIGNATURE_0_13
    if line == "0.13" and ("quantization" in path or "_apply_mlp" in old):
        path, old, new, message = QUANTIZED_0_13[path.startswith("quantization")]
    file = mutable_source / "vllm_ascend" / path
    text = file.read_text()
    assert old in text, f"the real source changed: {old!r} not in {path}"
    file.write_text(text.replace(old, new, 1))
    code = main(["validate", str(REPO / "configs" / "prod.yaml"), "--platform", "ascend",
                 "--vllm-line", line, "--source", f"vllm_ascend={mutable_source}",
                 *harness.stack_source_args(line)[2:]])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
