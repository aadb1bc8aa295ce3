"""`mmfuse export onnx --model DIR --out DIR [--dtype fp32|fp16] [--quantize int8] [--opset N] [--optimize]`."""
from __future__ import annotations

import argparse
import time


def register(subparsers) -> None:
    export = subparsers.add_parser("export", help="export a checkpoint to another runtime's format")
    fmt = export.add_subparsers(dest="format", required=True)
    p = fmt.add_parser("onnx", help="export to an ONNX folder (checked against the PyTorch engine)")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--quantize", default=None, choices=["int8"])
    p.add_argument("--opset", type=int, default=None, help="default-domain opset (default 17)")
    p.add_argument("--optimize", action="store_true",
                   help="onnxruntime contrib operators (GroupQueryAttention with a shared KV buffer, fused norms)")
    p.add_argument("--inputs-embeds", action="store_true",
                   help="decoder takes inputs_embeds instead of input_ids (the decoder of a vision-language model)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from . import export_onnx

    t = time.perf_counter()
    export_onnx(args.model, args.out, dtype=args.dtype, quantize=args.quantize, opset=args.opset,
                optimize=args.optimize, inputs_embeds=args.inputs_embeds)
    print(f"exported {args.model} -> {args.out} in {time.perf_counter() - t:.1f} s")
    return 0
