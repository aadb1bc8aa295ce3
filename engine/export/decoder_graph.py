"""The ONNX graph of the GPT-2 and Llama/Mistral/Qwen2 decoders, built node by node from the weights.

Layout (the names optimum and onnxruntime-genai use):
  inputs   input_ids (B, S) int64  [or inputs_embeds (B, S, C) for a vision-language decoder]
           attention_mask (B, P+S) int64, position_ids (B, S) int64,
           past_key_values.{i}.key / .value (B, H_kv, P, D)
  outputs  logits (B, S, V), present.{i}.key / .value (B, H_kv, P+S, D)
Batch, sequence and past length are dynamic. One more input, logit_positions (B, K) int64, has a
default (an overridable initializer of shape (1, 0)) meaning "every position": callers that do not
know it (onnxruntime-genai, optimum) get logits (B, S, V); mmfuse's runtime feeds each row's last
prompt position at prefill and gets (B, 1, V), so the LM head runs on one position per row, not S.

Two variants come from the same builder:
  portable  standard operators only: causal + padding mask from attention_mask, RoPE from cos/sin
            tables gathered at position_ids, present = Concat(past, new).
  optimised com.microsoft contrib operators as onnxruntime-genai's model builder emits them:
            SkipLayerNormalization / SkipSimplifiedLayerNormalization, GroupQueryAttention with the
            rotary embedding fused in, FastGelu, separate gate and up MatMuls (no Split copying their
            outputs; onnxruntime fuses x * Sigmoid(x) into QuickGelu). With `share_buffer` the past and present of
            GroupQueryAttention are one preallocated (B, H_kv, max_len, D) buffer that the runtime
            binds once (attention_mask then spans the buffer's filled part, as in genai).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from onnx import TensorProto

from ..decoder.config import DecoderConfig
from ..errors import ConfigError
from .graph import MS_DOMAIN, GraphBuilder

ONNX_DTYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
MIN_OPSET = 17  # LayerNormalization


@dataclass
class DecoderExportOptions:
    dtype: str = "fp32"            # "fp32" | "fp16": weights, activations, KV cache and logits
    opset: int = MIN_OPSET         # default-domain opset (>= 17)
    optimize: bool = False         # com.microsoft contrib operators (onnxruntime only)
    inputs_embeds: bool = False    # take inputs_embeds (B, S, C) instead of input_ids (VLM decoders)
    head_matmul: bool = False      # LM head as MatMul on its own [C, V] copy (int8: the quantizer skips Gemm)


def weights_from_model(model) -> dict:
    """The torch `Decoder`'s parameters as float32 numpy arrays, keyed by our module names."""
    import torch

    with torch.no_grad():
        return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


class DecoderGraph:
    """Builds the ONNX graph of one decoder from its config and weights (our layout: fused q/k/v
    (rows q, k, v), fused gate/up, nn.Linear [out, in] weights)."""

    def __init__(self, cfg: DecoderConfig, weights: dict, rope: Optional[tuple], opts: DecoderExportOptions):
        self.cfg, self.w, self.opts = cfg, weights, opts
        self.np_dtype, self.onnx_dtype = ONNX_DTYPES[opts.dtype]
        self.g = GraphBuilder("mmfuse_decoder", opts.opset)
        self.rope = rope  # (cos, sin) tables (max_len, D/2) float32, or None for learned positions
        self.neg = float(np.finfo(self.np_dtype).min)  # masked score (finite: a fully masked row stays finite)

    # -- small pieces -------------------------------------------------------------------------

    def _param(self, name: str, key: str, transpose: bool = False) -> str:
        a = self.w[key]
        return self.g.weight(name, (a.T if transpose else a).astype(self.np_dtype))

    def _scalar(self, value: float) -> str:
        return self.g.const(value, self.np_dtype)

    def _linear(self, x: str, name: str, key: str, rows: slice = slice(None)) -> str:
        """x @ W.T + b with W stored pre-transposed [in, out] (one MatMul, as the model builder);
        `rows`: only those output features of W and b."""
        w = self.w[key + ".weight"][rows].T.astype(self.np_dtype)
        y = self.g.op("MatMul", [x, self.g.weight(f"{name}.weight", w)], name=f"/{name}/MatMul")
        if key + ".bias" in self.w:
            b = self.g.weight(f"{name}.bias", self.w[key + ".bias"][rows].astype(self.np_dtype))
            y = self.g.op("Add", [y, b], name=f"/{name}/Add")
        return y

    def _reduce_mean_last(self, x: str) -> str:
        if self.opts.opset >= 18:
            return self.g.op("ReduceMean", [x, self.g.const([-1])], keepdims=1)
        return self.g.op("ReduceMean", [x], axes=[-1], keepdims=1)

    def _norm(self, x: str, name: str, key: str) -> str:
        """LayerNorm or RMSNorm (statistics in fp32, as transformers), standard operators. The RMSNorm is
        the Pow-ReduceMean-Add-Sqrt-Div-Mul chain onnxruntime fuses into one SimplifiedLayerNormalization
        when it loads the graph (fp32 on CPU), so the file stays standard ONNX and runs as one kernel."""
        g, eps = self.g, self.cfg.norm_eps
        w = self._param(f"{name}.weight", key + ".weight")
        if self.cfg.norm == "layernorm":
            return g.op("LayerNormalization", [x, w, self._param(f"{name}.bias", key + ".bias")], axis=-1,
                        epsilon=eps, name=f"/{name}/LayerNorm")
        h = x if self.np_dtype == np.float32 else g.op("Cast", [x], to=TensorProto.FLOAT)
        ms = self._reduce_mean_last(g.op("Pow", [h, g.const(2.0, np.float32)]))
        h = g.op("Div", [h, g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)])])])
        if self.np_dtype != np.float32:
            h = g.op("Cast", [h], to=self.onnx_dtype)
        return g.op("Mul", [w, h], name=f"/{name}/Mul")

    def _act(self, x: str) -> str:
        g, act = self.g, self.cfg.act
        if act == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x])])
        if act == "relu":
            return g.op("Relu", [x])
        if act == "quick_gelu":
            return g.op("Mul", [x, g.op("Sigmoid", [g.op("Mul", [x, self._scalar(1.702)])])])
        if act == "gelu_tanh":
            if self.opts.optimize:
                return g.op("FastGelu", [x], domain=MS_DOMAIN)
            inner = g.op("Add", [x, g.op("Mul", [g.op("Mul", [g.op("Mul", [x, x]), x]), self._scalar(0.044715)])])
            t = g.op("Tanh", [g.op("Mul", [inner, self._scalar(math.sqrt(2 / math.pi))])])
            return g.op("Mul", [g.op("Mul", [x, self._scalar(0.5)]), g.op("Add", [t, self._scalar(1.0)])])
        if act == "gelu":
            e = g.op("Erf", [g.op("Mul", [x, self._scalar(1 / math.sqrt(2))])])
            return g.op("Mul", [g.op("Mul", [x, self._scalar(0.5)]), g.op("Add", [e, self._scalar(1.0)])])
        raise ConfigError(f"activation {act!r} has no ONNX export")

    def _mlp(self, h: str, i: int) -> str:
        cfg, g = self.cfg, self.g
        key, F = f"blocks.{i}.mlp.up", cfg.d_ff
        if cfg.gated_mlp and self.opts.optimize:  # two MatMuls, as the model builder: no Split copying both halves
            gate = self._linear(h, f"model.layers.{i}.mlp.gate_proj", key, slice(0, F))
            h = g.op("Mul", [self._act(gate), self._linear(h, f"model.layers.{i}.mlp.up_proj", key, slice(F, 2 * F))])
        elif cfg.gated_mlp:
            gate, up = g.op("Split", [self._linear(h, f"model.layers.{i}.mlp.up_proj", key), g.const([F, F])],
                            n_out=2, axis=-1)
            h = g.op("Mul", [self._act(gate), up])
        else:
            h = self._act(self._linear(h, f"model.layers.{i}.mlp.up_proj", key))
        return self._linear(h, f"model.layers.{i}.mlp.down_proj", f"blocks.{i}.mlp.down")

    # -- graph --------------------------------------------------------------------------------

    def build(self):
        cfg, g, F = self.cfg, self.g, self.onnx_dtype
        Hkv, D = cfg.n_kv_head, cfg.head_dim
        share = self.opts.optimize
        past_len = "max_sequence_length" if share else "past_sequence_length"
        present_len = "max_sequence_length" if share else "total_sequence_length"
        if self.opts.inputs_embeds:
            x = g.input("inputs_embeds", F, ["batch_size", "sequence_length", cfg.d_model])
        else:
            ids = g.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
            x = g.op("Gather", [self._param("model.embed_tokens.weight", "embed.weight"), ids], name="/model/embed_tokens/Gather")
        mask = g.input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
        pos = g.input("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        for i in range(cfg.n_layer):
            for kv in ("key", "value"):
                g.input(f"past_key_values.{i}.{kv}", F, ["batch_size", Hkv, past_len, D])
        g.output("logits", F, ["batch_size", "sequence_length", cfg.vocab_size])
        for i in range(cfg.n_layer):
            for kv in ("key", "value"):
                g.output(f"present.{i}.{kv}", F, ["batch_size", Hkv, present_len, D])
        if cfg.learned_pos:
            x = g.op("Add", [x, g.op("Gather", [self._param("model.embed_positions.weight", "pos_embed.weight"), pos])])
        attend = self._portable_setup(mask, pos) if not share else self._gqa_setup(mask, pos)
        residual = x
        skip_out = None
        for i in range(cfg.n_layer):
            if share:
                h, residual = self._skip_norm(residual, skip_out, f"model.layers.{i}.input_layernorm", f"blocks.{i}.norm1")
            else:
                h = self._norm(residual, f"model.layers.{i}.input_layernorm", f"blocks.{i}.norm1")
            a = attend(h, i)
            if share:
                h, residual = self._skip_norm(residual, a, f"model.layers.{i}.post_attention_layernorm", f"blocks.{i}.norm2")
            else:
                residual = g.op("Add", [residual, a])
                h = self._norm(residual, f"model.layers.{i}.post_attention_layernorm", f"blocks.{i}.norm2")
            skip_out = self._mlp(h, i)
            if not share:
                residual = g.op("Add", [residual, skip_out])
        if share:
            h, _ = self._skip_norm(residual, skip_out, "model.norm", "norm_f")
        else:
            h = self._norm(residual, "model.norm", "norm_f")
        h, kept = self._logit_rows(h, pos)  # (B, K, C), (B, K)
        # LM head as Gemm(transB) on the [V, C] matrix: a tied head reuses the embedding table.
        flat = g.op("Reshape", [h, g.const([-1, cfg.d_model])])
        head_key = "lm_head.weight" if "lm_head.weight" in self.w else "embed.weight"
        if self.opts.head_matmul:
            logits = g.op("MatMul", [flat, self._param("lm_head.weight", head_key, transpose=True)], name="/lm_head/MatMul")
        else:
            head = "model.embed_tokens.weight" if cfg.tie_embeddings and not self.opts.inputs_embeds else None
            if head is None:
                head = self._param("lm_head.weight", head_key)
            logits = g.op("Gemm", [flat, head], transB=1, name="/lm_head/Gemm")
        out_shape = g.op("Concat", [g.op("Shape", [kept]), g.const([cfg.vocab_size])], axis=0)
        g.op_to("Reshape", [logits, out_shape], ["logits"])
        return g.model()

    def _logit_rows(self, h: str, pos: str):
        """The rows of h (B, S, C) the LM head runs on: logit_positions (B, K) when given, every
        position (the default, shape (1, 0)) otherwise. -> (h (B, K, C), positions (B, K))."""
        g = self.g
        given = g.optional_input("logit_positions", np.zeros((1, 0), np.int64), ["logit_batch", "logit_count"])
        shape = g.op("Shape", [pos])  # [B, S]
        B, S = (g.op("Slice", [shape, g.const([a]), g.const([a + 1])]) for a in (0, 1))
        K = g.op("Slice", [g.op("Shape", [given]), g.const([1]), g.const([2])])
        given = g.op("Expand", [given, g.op("Concat", [B, K], axis=0)])  # (B, K)
        every = g.op("Mul", [S, g.op("Cast", [g.op("Equal", [K, g.const([0])])], to=TensorProto.INT64)])  # [S] or [0]
        allpos = g.op("Expand", [g.op("Unsqueeze", [g.op("Range", [g.const(0), g.op("Squeeze", [S]), g.const(1)]),
                                                    g.const([0])]), shape])  # (B, S)
        allpos = g.op("Slice", [allpos, g.const([0]), every, g.const([1])])  # (B, S) or (B, 0)
        kept = g.op("Concat", [given, allpos], axis=1, name="/lm_head/positions")  # (B, K or S)
        rows = g.op("GatherND", [h, g.op("Unsqueeze", [kept, g.const([2])])], batch_dims=1, name="/lm_head/GatherND")
        return rows, kept

    # -- portable attention -------------------------------------------------------------------

    def _portable_setup(self, mask: str, pos: str):
        """Mask (B, 1, S, T) bool: key j is visible to query i iff j <= P + i and attention_mask[j];
        RoPE cos/sin (B, 1, S, D/2) gathered once at position_ids."""
        cfg, g = self.cfg, self.g
        T = g.op("Gather", [g.op("Shape", [mask]), g.const(1)], axis=0)  # scalar total length
        S = g.op("Gather", [g.op("Shape", [pos]), g.const(1)], axis=0)
        P = g.op("Sub", [T, S])
        kidx = g.op("Range", [g.const(0), T, g.const(1)])  # (T,)
        qidx = g.op("Range", [P, T, g.const(1)])  # (S,)
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [kidx, g.const([0])]), g.op("Unsqueeze", [qidx, g.const([1])])])
        pad = g.op("Unsqueeze", [g.op("Cast", [mask], to=TensorProto.BOOL), g.const([1, 2])])  # (B, 1, 1, T)
        keep = g.op("And", [g.op("Unsqueeze", [causal, g.const([0, 1])]), pad], name="/model/attn_mask/And")  # (B, 1, S, T)
        groups = cfg.n_head // cfg.n_kv_head
        if groups > 1:
            keep = g.op("Unsqueeze", [keep, g.const([1])])  # (B, 1, 1, S, T) for the grouped scores
        rope = None
        if self.rope is not None:
            cos_t, sin_t = (g.weight(n, t.astype(self.np_dtype)) for n, t in zip(("cos_cache", "sin_cache"), self.rope))
            rope = tuple(g.op("Unsqueeze", [g.op("Gather", [t, pos]), g.const([1])]) for t in (cos_t, sin_t))

        def attend(h: str, i: int) -> str:
            return self._portable_attention(h, i, keep, rope)

        return attend

    def _rotate(self, x: str, rope) -> str:
        """Half-split rotary embedding of (B, H, S, D) by cos/sin (B, 1, S, D/2)."""
        g, half = self.g, self.cfg.head_dim // 2
        cos, sin = rope
        x1, x2 = g.op("Split", [x, g.const([half, half])], n_out=2, axis=-1)
        return g.op("Concat", [g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])]),
                               g.op("Add", [g.op("Mul", [x2, cos]), g.op("Mul", [x1, sin])])], axis=-1)

    def _portable_attention(self, h: str, i: int, keep: str, rope) -> str:
        cfg, g = self.cfg, self.g
        Hq, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        groups = Hq // Hkv
        qkv = self._linear(h, f"model.layers.{i}.attn.qkv_proj", f"blocks.{i}.attn.qkv")  # (B, S, (Hq+2Hkv)D)
        qkv = g.op("Reshape", [qkv, g.const([0, 0, Hq + 2 * Hkv, D])])
        q, k, v = g.op("Split", [qkv, g.const([Hq, Hkv, Hkv])], n_out=3, axis=2)
        q, ks, vs = (g.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, k, v))  # (B, H, S, D)
        if rope is not None:
            q, ks = self._rotate(q, rope), self._rotate(ks, rope)
        q = g.op("Mul", [q, self._scalar(1 / math.sqrt(D))])
        k, v = f"present.{i}.key", f"present.{i}.value"  # (B, Hkv, T, D) = past + this call's
        g.op_to("Concat", [f"past_key_values.{i}.key", ks], [k], axis=2)
        g.op_to("Concat", [f"past_key_values.{i}.value", vs], [v], axis=2)
        if groups > 1:  # grouped scores by broadcasting: no copy of the shared K/V heads
            q = g.op("Reshape", [q, g.const([0, Hkv, groups, -1, D])])  # (B, Hkv, G, S, D)
            k, v = g.op("Unsqueeze", [k, g.const([2])]), g.op("Unsqueeze", [v, g.const([2])])  # (B, Hkv, 1, T, D)
            kt = g.op("Transpose", [k], perm=[0, 1, 2, 4, 3])
        else:
            kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
        scores = g.op("MatMul", [q, kt])  # (B, Hkv, G, S, T) or (B, H, S, T)
        scores = g.op("Where", [keep, scores, self._scalar(self.neg)])
        y = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        if groups > 1:
            y = g.op("Reshape", [y, g.const([0, Hq, -1, D])])
        y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.const([0, 0, Hq * D])])
        return self._linear(y, f"model.layers.{i}.attn.o_proj", f"blocks.{i}.attn.o")

    # -- optimised attention (com.microsoft) --------------------------------------------------

    def _skip_norm(self, residual: str, add: Optional[str], name: str, key: str):
        """(normed, new residual) of residual + add; a plain norm when there is nothing to add."""
        g, eps = self.g, self.cfg.norm_eps
        rms = self.cfg.norm == "rmsnorm"
        if add is None:  # the first norm has nothing to add: the standard-operator one
            return self._norm(residual, name, key), residual
        w = self._param(f"{name}.weight", key + ".weight")
        if rms:
            out = g.op("SkipSimplifiedLayerNormalization", [residual, add, w], n_out=4, domain=MS_DOMAIN,
                       epsilon=eps, name=f"/{name}/SkipSimplifiedLayerNorm")
        else:
            b = self._param(f"{name}.bias", key + ".bias")
            out = g.op("SkipLayerNormalization", [residual, add, w, b], n_out=4, domain=MS_DOMAIN, epsilon=eps,
                       name=f"/{name}/SkipLayerNorm")
        return out[0], out[3]

    def _gqa_setup(self, mask: str, pos: str):
        """seqlens_k (B,) int32 = filled positions per row - 1 and total_sequence_length (scalar
        int32), as the model builder derives them from attention_mask."""
        g = self.g
        filled = g.op("ReduceSum", [mask, g.const([1])], keepdims=0)
        seqlens = g.op("Cast", [g.op("Sub", [filled, g.const(1)])], to=TensorProto.INT32, name="/model/attn_mask/seqlens_k")
        total = g.op("Cast", [g.op("Gather", [g.op("Shape", [mask]), g.const(1)], axis=0)], to=TensorProto.INT32,
                     name="/model/attn_mask/total_seq_len")
        rope = None
        if self.rope is not None:
            rope = tuple(g.weight(n, t.astype(self.np_dtype)) for n, t in zip(("cos_cache", "sin_cache"), self.rope))
        fused_rope = self.cfg.head_dim % 16 == 0

        def attend(h: str, i: int) -> str:
            cfg = self.cfg
            qkv = self._linear(h, f"model.layers.{i}.attn.qkv_proj", f"blocks.{i}.attn.qkv")  # (B, S, (Hq+2Hkv)D)
            qkv_in = [qkv, "", ""]
            attrs = dict(num_heads=cfg.n_head, kv_num_heads=cfg.n_kv_head, scale=1 / math.sqrt(cfg.head_dim))
            rope_in = []
            if rope is not None and fused_rope:
                rope_in = list(rope)
                attrs.update(do_rotary=1, rotary_interleaved=0)
            elif rope is not None:  # GroupQueryAttention rotates only head sizes that are multiples of 16
                D = cfg.head_dim
                q, k, v = g.op("Split", [qkv, g.const([cfg.n_head * D, cfg.n_kv_head * D, cfg.n_kv_head * D])],
                               n_out=3, axis=-1)
                q, k = (g.op("RotaryEmbedding", [t, pos, *rope], domain=MS_DOMAIN, num_heads=n, interleaved=0)
                        for t, n in ((q, cfg.n_head), (k, cfg.n_kv_head)))
                qkv_in = [q, k, v]
            inputs = [*qkv_in, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total, *rope_in]
            y = f"/model/layers.{i}/attn/GroupQueryAttention/output_0"
            g.op_to("GroupQueryAttention", inputs, [y, f"present.{i}.key", f"present.{i}.value"], domain=MS_DOMAIN, **attrs)
            return self._linear(y, f"model.layers.{i}.attn.o_proj", f"blocks.{i}.attn.o")

        return attend


def check_opset(opset: int) -> None:
    import onnx

    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= int(opset) <= top:
        raise ConfigError(f"--opset {opset}: supported range is {MIN_OPSET}..{top}")
