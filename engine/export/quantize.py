"""int8 quantization of an exported ONNX graph (any of mmfuse's exports), with onnxruntime's tools.

Dynamic quantization: MatMul / Gemm weights are stored as int8 per output channel and each
activation is quantized to uint8 on the fly per call (DynamicQuantizeLinear -> MatMulInteger), so no
calibration data is needed; embedding tables (Gather) are stored as int8 too. Weights use 7 bits
(`reduce_range`): on CPUs without VNNI (this AVX2 box) the u8 x s8 product goes through vpmaddubsw,
whose int16 sums saturate with full-range weights; measured on the test's random CLIP text tower,
full-range per-channel weights gave cosine 0.965 to fp32, 7-bit weights 0.9997.
Dynamic int8 was kept over weight-only int8 (MatMulNBits needs onnx_ir, one more dependency): its
products run in integer arithmetic, so it gains speed at batch as well as size (bench/README.md).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import ExportCheckError


def quantize_int8(onnx_path, out_path) -> Path:
    """Write the dynamic-int8 version of the graph at `onnx_path` to `out_path` (weights in the
    file; the fp32 graph is left as it is). -> out_path."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise ExportCheckError(f"{onnx_path}: no such ONNX graph to quantize")
    # onnxruntime writes helper files beside its output: work in a private folder, move the result.
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize.") as work:
        tmp = Path(work) / "model.int8.onnx"
        quantize_dynamic(onnx_path, tmp, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         extra_options={"MatMulConstBOnly": True})
        os.replace(tmp, out_path)
    return out_path
