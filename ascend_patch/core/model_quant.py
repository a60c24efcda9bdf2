"""Which quantization a model is served with, as far as `plan` can know it without vLLM.

From `--quantization` (vLLM's method name, e.g. `ascend`; or a platform scheme name such as
vllm-ascend's `W8A8_DYNAMIC`, for a model directory that is not at hand), and from the model
directory: modelslim's quant_model_description.json (vllm-ascend's `ascend` method,
quantization/modelslim_config.py:67) names each weight's scheme, so the MoE layers' schemes are
the values of the routed experts' weights (`<layer>.experts.<i>.<proj>.weight`, how vllm-ascend
looks a fused MoE layer up, modelslim_config.py:348-382); config.json's quantization_config
names the method of other checkpoints (compressed-tensors, fp8, ...), not a per-layer scheme.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ascend_patch.core.profiles import read_json_object

MODELSLIM_FILE = "quant_model_description.json"
_EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.[A-Za-z0-9_]+\.weight$")


@dataclass(frozen=True)
class ModelQuantization:
    method: str | None  # vLLM's --quantization name; None: unquantized or unknown
    moe_schemes: tuple[str, ...]  # the MoE layers' scheme names, when known
    source: str  # where it was read


def model_quantization(model: str | None, quantization: str | None) -> ModelQuantization | None:
    """What is known of the model's quantization; None: nothing says it is quantized."""
    method, schemes, sources = None, (), []
    directory = Path(model) if model is not None else None
    if directory is not None and (directory / MODELSLIM_FILE).is_file():
        path = directory / MODELSLIM_FILE
        data = read_json_object(path, f"--model {model}")
        method = "ascend"
        schemes = tuple(sorted({str(v) for k, v in data.items() if _EXPERT_WEIGHT.search(k)}))
        sources.append(str(path))
    elif directory is not None and (directory / "config.json").is_file():
        config = read_json_object(directory / "config.json", f"--model {model}")
        found = config.get("quantization_config")
        if isinstance(found, dict) and isinstance(found.get("quant_method"), str):
            method = found["quant_method"]
            sources.append(f"{directory / 'config.json'} quantization_config")
    if quantization is not None:
        if quantization.isupper():  # a scheme name: vllm-ascend's come with --quantization ascend
            method, schemes = method or "ascend", (quantization,)
        else:
            method = quantization
        sources.append(f"--quantization {quantization}")
    if method is None and not schemes:
        return None
    return ModelQuantization(method, schemes, ", ".join(sources))
