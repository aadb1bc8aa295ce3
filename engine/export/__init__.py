"""Export checkpoints to ONNX: `export_onnx(model_dir, out_dir, ...)` reads config.json and picks
the layout: decoders (GPT-2, Llama, Mistral, Qwen2) go to `onnx_decoder`, encoders (CLIP, SigLIP,
BERT sentence encoders) to `onnx_encoder`, vision-language models (llava, llava_next, idefics3 / smolvlm) to `onnx_vlm`. Every export is checked before it is reported done."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..jsonfile import read_config
from ..errors import ConfigError

DECODER_TYPES = ("gpt2", "llama", "mistral", "qwen2")
ENCODER_TYPES = ("clip", "siglip", "bert")
VLM_TYPES = ("llava", "llava_next", "idefics3", "smolvlm")
QUANTIZE = (None, "int8")


def export_onnx(model_dir, out_dir, dtype: str = "fp32", quantize: Optional[str] = None, opset: Optional[int] = None,
                optimize: bool = False, inputs_embeds: bool = False) -> dict:
    """Export the checkpoint folder `model_dir` to the folder `out_dir`; returns its manifest."""
    model_dir = Path(model_dir)
    mt = read_config(model_dir).get("model_type")
    if quantize not in QUANTIZE:
        raise ConfigError(f"--quantize {quantize!r}: expected one of {[q for q in QUANTIZE if q]}")
    if mt in DECODER_TYPES:
        from .decoder_graph import MIN_OPSET
        from .onnx_decoder import export_decoder

        return export_decoder(model_dir, out_dir, dtype=dtype, opset=opset or MIN_OPSET, optimize=optimize,
                              inputs_embeds=inputs_embeds, quantize=quantize)
    if mt in ENCODER_TYPES:
        if optimize or inputs_embeds:
            raise ConfigError(f"--optimize / inputs_embeds apply to decoders, not to model_type {mt!r}")
        from .onnx_encoder import export_encoder

        return export_encoder(model_dir, out_dir, dtype, opset, quantize)
    if mt in VLM_TYPES:
        if inputs_embeds:
            raise ConfigError(f"--inputs-embeds: a {mt} export always has an inputs_embeds decoder; drop the flag")
        from .onnx_vlm import export_vlm

        return export_vlm(model_dir, out_dir, dtype=dtype, opset=opset, optimize=optimize, quantize=quantize)
    raise ConfigError(f"{model_dir / 'config.json'}: model_type {mt!r} has no ONNX export "
                      f"(supported: {sorted(DECODER_TYPES + ENCODER_TYPES + VLM_TYPES)})")
