"""int8 quantization of an exported ONNX graph (any of mmfuse's exports), with onnxruntime's tools.

Dynamic quantization: MatMul / Gemm weights are stored as int8 per output channel and each
activation is quantized to uint8 on the fly per call (DynamicQuantizeLinear -> MatMulInteger), so no
calibration data is needed; embedding tables (Gather) are stored as int8 too. Weights use 7 bits
(`reduce_range`): on CPUs without VNNI (this AVX2 box) the u8 x s8 product goes through vpmaddubsw,
whose int16 sums saturate with full-range weights; measured on the test's random CLIP text tower,
full-range per-channel weights gave cosine 0.965 to fp32, 7-bit weights 0.9997.
Dynamic int8 was kept over weight-only int8 (MatMulNBits needs onnx_ir, one more dependency): its
products run in integer arithmetic, so it gains speed at batch as well as size (bench/README.md).
Decoder graphs (portable and optimised) take the same path: the quantizer types the outputs of the
com.microsoft operators it cannot infer (GroupQueryAttention, SkipSimplifiedLayerNormalization) as
float32 (`DefaultTensorType`), and the decoder's LM head is exported as a MatMul for it (the
quantizer leaves Gemm in float).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import ExportCheckError


def quantize_int8(onnx_path, out_path, external_data: bool = False) -> Path:
    """Write the dynamic-int8 version of the graph at `onnx_path` (its external data, if any, read
    from beside it) to `out_path`; with `external_data` the weights go to `<out_path name>.data`
    beside it (graphs over 2 GB need that). The fp32 graph is left as it is. -> out_path."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise ExportCheckError(f"{onnx_path}: no such ONNX graph to quantize")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # onnxruntime writes helper files beside its output: work in a private folder, then move the graph
    # (and its data file, whose name the graph records) into place.
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize.") as work:
        tmp = Path(work) / out_path.name
        quantize_dynamic(onnx_path, tmp, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         use_external_data_format=external_data,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT})
        if external_data:
            os.replace(tmp.with_name(tmp.name + ".data"), out_path.with_name(out_path.name + ".data"))
        os.replace(tmp, out_path)
    return out_path
