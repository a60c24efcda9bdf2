"""Catalog entries of the device ops (light: no torch import).

On vLLM's own platforms (CPU, CUDA) every RMSNorm and SiluAndMul reaches `forward_native`
(0.23 and 0.32 alike: layernorm.py:82 / activation.py:138 in 0.23), so that is the site. On
vllm-ascend these classes are swapped at construction for AscendRMSNorm / AscendSiluAndMul
(`CustomOp.register_oot`), whose `forward_oot` already calls torch_npu.npu_rms_norm /
npu_add_rms_norm / npu_swiglu (vllm_ascend/ops/layernorm.py:63, ops/activation.py:38 in
0.23.0.post1): patching vLLM's forward_native there would change nothing, and patching
vllm-ascend's forward_oot would replace its fused-bias and weight-prefetch paths with less.
So on Ascend the entry reports "provided by vllm-ascend" and patches nothing.
"""

from ascend_patch.core.catalog import (
    Attribute,
    Implementation,
    Interface,
    Site,
    SiteSet,
    ascend_only_lines,
    no_ascend_release,
)

_VLLM_LINES = ("0.23", "0.32", "0.33", "0.34")
# Same classes, same forward_oot signatures in vllm-ascend 0.13.0 and 0.18.0 (layernorm.py:46
# and :63, activation.py:33 in both).
_ASCEND_LINES = ("0.13", "0.18", "0.23")
_FACTORIES = "ascend_patch.impls.ops.layers"

_WHY_FORWARD_NATIVE = (
    "CustomOp binds its forward at construction; on CPU RMSNorm.forward_cpu calls "
    "forward_native, so replacing forward_native before the model is built reaches every "
    "RMSNorm. On vllm-ascend its own AscendRMSNorm.forward_oot already calls torch_npu."
)


# What forward_native's replacement reads on the RMSNorm (`self`). The factories of both ops
# live in one module, so the audit (checks/attribute_audit.py) holds both entries to them.
_RMS_NORM = "vllm.model_executor.layers.layernorm:RMSNorm"
_LAYER_READS = tuple(
    Attribute(f"{_RMS_NORM}.{name}", "RMSNorm's own state, read as its forward_native does")
    for name in ("variance_epsilon", "variance_size_override", "weight", "pass_weight",
                 "pass_weight_add")
)


def _op(name: str, summary: str, why: str, target: str, signature: str, factory: str,
        ascend_target: str, ascend_signature: str, calls: str) -> Implementation:
    """An op patched at `target` on vLLM's own platforms and provided by vllm-ascend's own
    `ascend_target` (which calls torch_npu's `calls`) on Ascend."""
    return Implementation(
        name=name,
        summary=summary,
        why=why,
        site_sets=(
            SiteSet(lines=_VLLM_LINES, sites=(Site(target, signature, f"{_FACTORIES}:{factory}"),),
                    reads=_LAYER_READS),
            SiteSet(
                lines=_ASCEND_LINES,
                platform="ascend",
                provided=f"provided by vllm-ascend: {ascend_target.rsplit(':', 1)[-1]} already "
                f"calls {calls}",
                relies_on=(Interface(ascend_target, ascend_signature,
                                     f"vllm-ascend's own op, which calls {calls}"),),
            ),
            no_ascend_release(),
            ascend_only_lines(),
        ),
    )

IMPLEMENTATIONS = {
    "ops.rms_norm": _op(
        "ops.rms_norm",
        "RMSNorm (and fused residual add) via torch_npu.npu_rms_norm on NPU, PyTorch elsewhere",
        _WHY_FORWARD_NATIVE,
        "vllm.model_executor.layers.layernorm:RMSNorm.forward_native", "(self, x, residual=…)",
        "make_rms_norm_forward",
        "vllm_ascend.ops.layernorm:AscendRMSNorm.forward_oot", "(self, x, residual=…)",
        "torch_npu.npu_rms_norm / npu_add_rms_norm",
    ),
    "ops.silu_and_mul": _op(
        "ops.silu_and_mul",
        "SwiGLU activation via torch_npu.npu_swiglu on NPU, PyTorch elsewhere",
        "SiluAndMul.forward_native is a staticmethod used by forward_cpu and whenever the "
        "custom op is disabled, so it is the one symbol vLLM's own platforms reach.",
        "vllm.model_executor.layers.activation:SiluAndMul.forward_native", "(x)",
        "make_silu_and_mul_forward",
        "vllm_ascend.ops.activation:AscendSiluAndMul.forward_oot", "(self, x)",
        "torch_npu.npu_swiglu",
    ),
}
