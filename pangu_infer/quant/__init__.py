"""Weight-only int8 / int4 quantization and MoGE expert offload.

    LLM(model, quantization="int8" | "int4")          # quantize while loading
    LLM(model, offload_experts=True)                   # MoGE experts stay memory-mapped
    pangu-infer quantize --model DIR --out DIR --method int4 --group-size 128

formats.py (number formats, quantize/dequantize), modules.py (kernel layouts and the modules
swapped in), loading.py (the load_weights hook, resident byte counts), checkpoint.py (pre-quantized
checkpoints), cli.py (`pangu-infer quantize`).
"""

from pangu_infer.quant.formats import (
    DEFAULT_GROUP_SIZE,
    INT4_GROUP_SIZES,
    METHODS,
    QuantizationConfig,
    QuantizationError,
    QuantizedTensor,
    dequantize,
    quantize,
)
from pangu_infer.quant.loading import quantized_weight_bytes

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "INT4_GROUP_SIZES",
    "METHODS",
    "QuantizationConfig",
    "QuantizationError",
    "QuantizedTensor",
    "dequantize",
    "quantize",
    "quantized_weight_bytes",
]
