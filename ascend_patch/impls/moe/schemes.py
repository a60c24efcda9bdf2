"""vllm-ascend's quantized MoE schemes, by the names its registry and modelslim use (light).

A modelslim checkpoint (`--quantization ascend`) names each weight's scheme in its
quant_model_description.json; vllm-ascend builds the layer's scheme from the name registered
with `@register_scheme(name, "moe")` (quantization/methods/registry.py) and wraps it in
AscendFusedMoEMethod. moe.capacity's site set for a release lists the schemes it takes over
(`SiteSet.quantized_layers`), so `plan` can say, before anything runs, whether a quantized
model's MoE layers will drop.
"""

from __future__ import annotations

# Registered MoE schemes of vllm-ascend 0.23.0.post1 (QM = vllm_ascend/quantization/methods/).
# Each one's apply ends in moe_comm_method.fused_experts, hence in build_token_dispatch_input;
# 0.23.0.post1's site set declares exactly these (quantized_layers), and the adapter takes over
# what the running release's site set declares.
ASCEND_0_23_MOE_SCHEMES = (
    # contract-tested on CPU with emulated ops (tests/ascend/test_contract.py):
    "W8A8_DYNAMIC",  # QM/w8a8_dynamic.py:155, apply :326 (DeepSeek-V3/R1 W8A8 from modelslim)
    "W4A8_DYNAMIC",  # QM/w4a8.py:231, apply :570
    # admitted from reading their source only:
    "W8A8_MIX",  # QM/w8a8_pdmix.py:88, inherits W8A8_DYNAMIC's apply
    "W8A8FP8_DYNAMIC",  # QM/w8a8fp8_dynamic.py:69, inherits W8A8_DYNAMIC's apply
    "W4A16",  # QM/w4a16.py:111, apply :308
    "W8A8_MXFP8",  # QM/w8a8_mxfp8.py:211, apply :329 (A5 only)
    "W4A8_MXFP",  # QM/w4a8_mxfp4.py:99, apply :206 (A5 only)
    "FP8",  # QM/fp8.py:81, registered for "w4a8_moe", the W4A8_MXFP path (A5 only)
    "W4A4_MXFP4",  # QM/w4a4_mxfp4.py:118, apply :225 (A5 only)
    "W4A16_MXFP4",  # QM/w4a16_mxfp4.py:55, apply :176 (A5 only)
)
