"""Key tables of the encoders' Transformer layers: `nn.layers.Block`s under CLIP/SigLIP or BERT
checkpoint names (the table machinery itself is `mmfuse.weight_map`)."""
from __future__ import annotations

from ..weight_map import KeyTable


def block_keys(ours: str, theirs: str, n_layer: int, style: str) -> KeyTable:
    """Keys of n_layer `nn.layers.Block`s: "clip" (CLIP/SigLIP encoder layers) or "bert" names."""
    if style == "clip":
        names = {"attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                 "attn.o": ["self_attn.out_proj"], "mlp.up": ["mlp.fc1"], "mlp.down": ["mlp.fc2"],
                 "norm1": ["layer_norm1"], "norm2": ["layer_norm2"]}
    elif style == "bert":
        names = {"attn.qkv": ["attention.self.query", "attention.self.key", "attention.self.value"],
                 "attn.o": ["attention.output.dense"], "mlp.up": ["intermediate.dense"],
                 "mlp.down": ["output.dense"], "norm1": ["attention.output.LayerNorm"],
                 "norm2": ["output.LayerNorm"]}
    else:
        raise ValueError(f"unknown block key style {style!r}")
    table = []
    for i in range(n_layer):
        for o, t in names.items():
            for p in ("weight", "bias"):
                table.append((f"{ours}.{i}.{o}.{p}", [f"{theirs}.{i}.{n}.{p}" for n in t]))
    return table
