"""The fused CPU decode step: one C++ call (mmfuse._decode, csrc/decode/) per step for the whole model.

A batch-1 decode step through PyTorch is some 15 ops per layer, each with its Python, dispatch and
thread hand-off costs; on a narrow 30-layer model those fixed costs, not the weights streamed,
bound the step. The extension runs every layer for the batch's rows inside one OpenMP parallel
region, each op cut into chunks the threads take from an atomic counter (no barriers that wait for
a descheduled thread; csrc/decode/step.cpp): norms, the q/k/v projection, RoPE from
the model's tables, the key/value writes into the `KVCache` buffers in place, attention over each
row's cached positions, the MLP, residuals, final norm and LM head, reading the weights where
PyTorch keeps them. A call runs rows of (cache row, position, token): one per cache row (a decode
step), or several tokens per cache row (`append`, `rows`: speculative verification, a short prompt
continuation), whose keys and values all land before any row attends. fp32 weights and the
engine's int8 / int4 formats (kernels/quant_cpu.py) run; quantized layers whose groups fit blocks
of 32 take integer dot products with the activation quantized to int8 on the fly where the CPU has
AVX-512 VNNI (`MMFUSE_INT8_ACTIVATIONS=0`: fp32 arithmetic on dequantized registers instead).

bf16 models run with bf16 weights (the tied embedding too, as the LM head) and a bf16 KV cache, read
where PyTorch keeps them; their small tensors (norms, biases, the position table) are copied to
fp32 at build time. Numerics: the residual stream, norms, RoPE, softmax and logits stay fp32, and
what is bf16 is what meets a bf16 operand: each layer's input is rounded to bf16 (round to nearest
even, as PyTorch holds it; the products are then exact and summed in fp32) and the keys and values
are rounded as the cache stores them. PyTorch's bf16 path also rounds every intermediate (each
residual add, norm, activation) to bf16, so the fused step is closer to an fp64 evaluation of the
same weights than it is, and differs from it by about its own rounding error (tests/test_fused_decode.py
bounds both). Logits come back fp32.

`FusedStep.build` returns None for what it does not run (fp16 and other dtypes, other devices,
quantized layers in a bf16 model, GPTQ activation order, a missing extension; `unsupported` says
why), and the caller keeps the PyTorch path, which
is also the reference the tests compare against. The weights are read where they were when the
step was built: `DecodeState` builds it once per cache (weights are inference constants there,
see `cpu_linear.freeze`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from mmfuse import envs

from ..nn.layers import RMSNorm
from ..quant.linear import QuantizedEmbedding, QuantizedLinear

try:
    from .. import _decode
except ImportError:  # built without the extension (setup.py warned): the PyTorch path
    _decode = None

ACT_CODES = {"gelu_tanh": 1, "gelu": 2, "quick_gelu": 3, "silu": 4, "relu": 5}  # csrc/decode/decode.hh `Act`


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _float(t: Optional[torch.Tensor], shape: tuple, dtype=torch.float32) -> bool:
    return t is None or (t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() and tuple(t.shape) == shape)


FLOATS = (torch.float32, torch.bfloat16)  # the model dtypes the step runs


class _Unsupported(Exception):
    pass


class FusedStep:
    """The compiled plan of one model for one KV cache batch size; call it as the decode step."""

    def __init__(self, plan, tensors: list, vocab: int, batch: int, dtype: torch.dtype):
        self._plan = plan
        self._tensors = tensors  # what the plan points into, kept alive with it
        self.vocab, self.batch = vocab, batch
        self.dtype = dtype  # the model's, and its KV cache's
        self._cache_rows = torch.arange(batch)  # (B,) the cache row of each row of a decode step

    @property
    def integer_layers(self) -> int:
        """Linear layers that run as integer dot products (int8 activations)."""
        return self._plan.vnni_layers()

    @staticmethod
    def unsupported(model: nn.Module) -> Optional[str]:
        """Why `build` would return None for `model`, or None when it runs it."""
        try:
            _Builder(model, 1, False, True).check()
        except _Unsupported as e:
            return str(e)
        return None

    @classmethod
    def build(cls, model: nn.Module, batch: int, int_dots: Optional[bool] = None,
              bf16_dots: bool = True) -> Optional["FusedStep"]:
        """The fused step of `model` for `batch` rows, or None where it does not run. `int_dots`:
        integer dot products for quantized layers (default: `MMFUSE_INT8_ACTIVATIONS`); `bf16_dots`:
        AVX-512 BF16 dot products for bf16 layers where the CPU has them (False: the portable kernel
        of other CPUs, the same products summed in another order)."""
        if int_dots is None:
            int_dots = envs.read("MMFUSE_INT8_ACTIVATIONS")
        try:
            return _Builder(model, batch, int_dots, bf16_dots).build()
        except _Unsupported:
            return None

    def __call__(self, tokens: torch.Tensor, cache, rope_cos: Optional[torch.Tensor],
                 rope_sin: Optional[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B,) at each row's next position `cache.lengths` -> fp32 logits (B, V) (in `out` when
        given). Writes the keys and values of that position into `cache` (of the model's dtype);
        advancing its lengths is the caller's."""
        # a sampler's (B,) int64 tokens go as they are: each tensor op here costs tens of microseconds
        # once the step has streamed the weights through the caches
        plain = tokens.dim() == 1 and tokens.dtype == torch.long and tokens.is_contiguous()
        tok = tokens if plain else tokens.reshape(-1).to(torch.long).contiguous()
        if tok.shape[0] != self.batch:
            raise ValueError(f"fused step built for {self.batch} rows, got {tok.shape[0]} tokens")
        return self._run(tok, self._cache_rows, cache.lengths, cache, rope_cos, rope_sin, out)

    def append(self, tokens: torch.Tensor, cache, rope_cos: Optional[torch.Tensor],
               rope_sin: Optional[torch.Tensor]) -> torch.Tensor:
        """tokens (B, k) after each row's cached positions -> logits (B, k, V), as the decoder's
        forward over them (causal within the k); advancing the cache's lengths is the caller's."""
        B, k = tokens.shape
        positions = cache.lengths[:, None] + torch.arange(k)  # (B, k)
        rows = self._cache_rows if k == 1 else self._cache_rows.repeat_interleave(k)
        return self.rows(tokens.reshape(-1), rows, positions.view(-1), cache, rope_cos, rope_sin).view(B, k, -1)

    def rows(self, tokens: torch.Tensor, cache_rows: torch.Tensor, positions: torch.Tensor, cache,
             rope_cos: Optional[torch.Tensor], rope_sin: Optional[torch.Tensor],
             out: Optional[torch.Tensor] = None, logits_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """R rows, each token tokens[r] at position positions[r] of cache row cache_rows[r] (R,), no
        two at one position of one cache row -> logits (R, V) (in `out` when given), or only those of
        the rows in `logits_index` (n,) -> (n, V) (a prompt's last tokens: the LM head runs for those
        rows alone). Every row's keys and values land in `cache` first, then each row attends over
        positions [0, positions[r]] of its cache row, which includes the rows of this call at earlier
        positions (in any order). An index out of range (token, cache row, position past the cache or
        the RoPE tables, logits row) raises ValueError before anything is written."""
        tok, crow, pos = (t.reshape(-1).to(torch.long).contiguous() for t in (tokens, cache_rows, positions))
        if not tok.shape == crow.shape == pos.shape:
            raise ValueError(f"fused step: {tok.shape[0]} tokens, {crow.shape[0]} cache rows and {pos.shape[0]} positions")
        index = None if logits_index is None else logits_index.reshape(-1).to(torch.long).contiguous()
        if index is not None and index.shape[0] == 0:
            raise ValueError("fused step: no logits row asked for (an empty logits_index)")
        return self._run(tok, crow, pos, cache, rope_cos, rope_sin, out, index)

    def _run(self, tok: torch.Tensor, crow: torch.Tensor, pos: torch.Tensor, cache, rope_cos: Optional[torch.Tensor],
             rope_sin: Optional[torch.Tensor], out: Optional[torch.Tensor],
             index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`rows` on contiguous int64 (R,) tensors (`index`: (n,) or None)."""
        R = tok.shape[0] if index is None else index.shape[0]  # logits rows
        if cache.batch != self.batch:
            raise ValueError(f"fused step built for a cache of {self.batch} rows, got one of {cache.batch}")
        if not (cache.k.dtype == cache.v.dtype == self.dtype and cache.k.is_contiguous() and cache.v.is_contiguous()):
            raise ValueError(f"the fused step of a {self.dtype} model needs a contiguous {self.dtype} KV cache, got "
                             f"{cache.k.dtype}")
        logits = torch.empty(R, self.vocab, dtype=torch.float32) if out is None else out
        if logits.shape != (R, self.vocab) or logits.dtype != torch.float32 or not logits.is_contiguous():
            raise ValueError(f"out must be a contiguous fp32 ({R}, {self.vocab}) tensor")
        self._plan.step(tok.shape[0], tok.data_ptr(), crow.data_ptr(), pos.data_ptr(), cache.k.data_ptr(),
                        cache.v.data_ptr(), cache.max_len, _ptr(rope_cos), _ptr(rope_sin),
                        0 if rope_cos is None else rope_cos.shape[0], logits.data_ptr(), torch.get_num_threads(),
                        R, _ptr(index))
        return logits


class _Builder:
    """Checks a model module by module and hands its tensors to the extension's `Plan`."""

    def __init__(self, model: nn.Module, batch: int, int_dots: bool, bf16_dots: bool):
        self.model, self.batch, self.int_dots, self.bf16_dots = model, batch, int_dots, bf16_dots
        self.dtype = getattr(getattr(model, "norm_f", None), "weight", torch.empty(0)).dtype  # the model's dtype
        self.tensors: list = []

    def check(self) -> None:
        from .transformer import Decoder

        m = self.model
        if _decode is None:
            raise _Unsupported("mmfuse was installed without its C++ extension mmfuse._decode")
        if not isinstance(m, Decoder) or type(m).forward is not Decoder.forward:
            raise _Unsupported(f"{type(m).__name__} is not a plain Decoder")
        cfg = m.cfg
        if not cfg.prenorm:
            raise _Unsupported("post-norm blocks")
        if cfg.act not in ACT_CODES:
            raise _Unsupported(f"activation {cfg.act!r}")
        if self.dtype not in FLOATS or m.norm_f.weight.device.type != "cpu":
            raise _Unsupported(f"{self.dtype} on {m.norm_f.weight.device}: the fused step runs fp32 and bf16 on the CPU")
        self.embed()
        for block in m.blocks:
            self.layer(block)
        self.head()

    def build(self) -> FusedStep:
        self.check()
        m, cfg = self.model, self.model.cfg
        plan = _decode.Plan(self.batch, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff,
                            cfg.vocab_size, ACT_CODES[cfg.act], cfg.gated_mlp, not cfg.learned_pos,
                            float(cfg.norm_eps), bool(self.int_dots), self.dtype == torch.bfloat16,
                            bool(self.bf16_dots))
        table, quantized, pos = self.embed()
        plan.set_embed(table, quantized, pos)
        for block in m.blocks:
            plan.add_layer(*self.layer(block))
        plan.set_head(*self.head())
        return FusedStep(plan, self.tensors, cfg.vocab_size, self.batch, self.dtype)

    def keep(self, t: Optional[torch.Tensor]) -> int:
        if t is not None:
            self.tensors.append(t)
        return _ptr(t)

    def small(self, t: Optional[torch.Tensor], shape: tuple, name: str) -> int:
        """A norm weight, bias or position table of the model's dtype as fp32 (a copy where bf16)."""
        if t is None:
            return 0
        if not _float(t.detach(), shape, self.dtype):
            raise _Unsupported(f"{name}: not {self.dtype} {shape} contiguous on the CPU")
        return self.keep(t.detach().float())

    def norm(self, nm: nn.Module, name: str) -> tuple:
        C = self.model.cfg.d_model
        if isinstance(nm, RMSNorm):
            w, b = nm.weight, None
        elif isinstance(nm, nn.LayerNorm) and nm.elementwise_affine and nm.bias is not None:
            w, b = nm.weight, nm.bias
        else:
            raise _Unsupported(f"{name}: {type(nm).__name__}")
        return self.small(w, (C,), f"{name}.weight"), self.small(b, (C,), f"{name}.bias")

    def linear(self, lin: nn.Module, name: str, n: int, k: int) -> tuple:
        """(bits, weight, scales, zeros, bias, n, k, group_size, groups) as module.cpp reads it."""
        if isinstance(lin, nn.Linear):
            bias = self.small(lin.bias, (n,), f"{name}.bias")
            if not _float(lin.weight.detach(), (n, k), self.dtype):
                raise _Unsupported(f"{name}: weight not {self.dtype} ({n}, {k}) contiguous on the CPU")
            return 32 if self.dtype == torch.float32 else 16, self.keep(lin.weight.detach()), 0, 0, bias, n, k, 0, 0
        if self.dtype != torch.float32:
            raise _Unsupported(f"{name}: quantized layers in a {self.dtype} model")
        bias = self.small(lin.bias, (n,), f"{name}.bias")
        if isinstance(lin, QuantizedLinear):
            return self.quantized(lin, name, n, k) + (bias, n, k, lin.group_size, lin.scales.shape[1])
        raise _Unsupported(f"{name}: {type(lin).__name__}")

    def quantized(self, lin: QuantizedLinear, name: str, n: int, k: int) -> tuple:
        if lin.in_perm is not None:
            raise _Unsupported(f"{name}: activation-ordered (desc_act) groups")
        if lin.out_features != n or lin.in_features != k or lin.qweight.device.type != "cpu":
            raise _Unsupported(f"{name}: {lin.out_features}x{lin.in_features} on {lin.qweight.device}")
        if not (lin.qweight.is_contiguous() and _float(lin.scales, tuple(lin.scales.shape))
                and (lin.zeros is None or lin.zeros.is_contiguous())):
            raise _Unsupported(f"{name}: non-contiguous quantized tensors")
        return lin.bits, self.keep(lin.qweight), self.keep(lin.scales), self.keep(lin.zeros)

    def embed(self) -> tuple:
        m, cfg = self.model, self.model.cfg
        V, C = cfg.vocab_size, cfg.d_model
        pos = 0 if m.pos_embed is None else self.small(m.pos_embed.weight, (cfg.max_seq_len, C), "pos_embed")
        e = m.embed
        if isinstance(e, nn.Embedding) and _float(e.weight.detach(), (V, C)):
            return self.keep(e.weight.detach()), None, pos
        if isinstance(e, nn.Embedding) and _float(e.weight.detach(), (V, C), torch.bfloat16):  # read as bf16 rows
            return 0, (16, self.keep(e.weight.detach()), 0, 0, 0, V, C, 0, 0), pos
        if isinstance(e, QuantizedEmbedding) and e.dtype == torch.float32:
            return 0, self.quantized(e.table, "embed", V, C) + (0, V, C, e.table.group_size, e.table.scales.shape[1]), pos
        raise _Unsupported(f"embed: {type(e).__name__} that is not fp32 or bf16 on the CPU")

    def layer(self, block: nn.Module) -> tuple:
        cfg = self.model.cfg
        C, H, Hkv, D, F = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff
        a, mlp = block.attn, block.mlp
        return (self.norm(block.norm1, "norm1"), self.norm(block.norm2, "norm2"),
                self.linear(a.qkv, "attn.qkv", (H + 2 * Hkv) * D, C), self.linear(a.o, "attn.o", C, H * D),
                self.linear(mlp.up, "mlp.up", F * (2 if cfg.gated_mlp else 1), C), self.linear(mlp.down, "mlp.down", C, F))

    def head(self) -> tuple:
        cfg = self.model.cfg
        return self.norm(self.model.norm_f, "norm_f"), self.linear(self.model.lm_head, "lm_head", cfg.vocab_size,
                                                                    cfg.d_model)
