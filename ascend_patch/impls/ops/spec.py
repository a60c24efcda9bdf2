"""Catalog entries of the device ops (light: no torch import)."""

from ascend_patch.core.catalog import Implementation, Site

_WHY_FORWARD_NATIVE = (
    "CustomOp binds its forward at construction; on CPU RMSNorm.forward_cpu and forward_oot "
    "(Ascend) both call forward_native, so replacing forward_native before the model is built "
    "reaches every RMSNorm on both platforms."
)

IMPLEMENTATIONS = {
    "ops.rms_norm": Implementation(
        name="ops.rms_norm",
        summary="RMSNorm (and fused residual add) via torch_npu.npu_rms_norm on NPU, PyTorch elsewhere",
        why=_WHY_FORWARD_NATIVE,
        vllm_versions=">=0.32,<0.33",
        sites=(
            Site(
                target="vllm.model_executor.layers.layernorm:RMSNorm.forward_native",
                signature="(self, x, residual=…)",
                factory="ascend_patch.impls.ops.layers:make_rms_norm_forward",
            ),
        ),
    ),
    "ops.silu_and_mul": Implementation(
        name="ops.silu_and_mul",
        summary="SwiGLU activation via torch_npu.npu_swiglu on NPU, PyTorch elsewhere",
        why="SiluAndMul.forward_native is a staticmethod used by forward_cpu, forward_oot and "
        "whenever the custom op is disabled, so it is the one symbol every platform reaches.",
        vllm_versions=">=0.32,<0.33",
        sites=(
            Site(
                target="vllm.model_executor.layers.activation:SiluAndMul.forward_native",
                signature="(x)",
                factory="ascend_patch.impls.ops.layers:make_silu_and_mul_forward",
            ),
        ),
    ),
}
