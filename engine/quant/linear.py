"""`QuantizedLinear`: a linear layer whose weight is int8 or int4 with a scale (and zero point) per
group of input columns, and round-to-nearest quantization of a float weight into it.

The storage layout is the one `mmfuse.kernels.quant_cpu` documents (its `dequantize` defines the
values); published formats (GPTQ, AWQ) are unpacked into it by `gptq.py` / `awq.py`. A GPTQ
checkpoint quantized in activation order (`desc_act`) has its groups scattered over the input
columns; its columns are stored sorted by group and `in_perm` gathers the input to match.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfuse.kernels.quant_cpu import dequantize, pack_int4, quant_linear

from ..errors import CheckpointError

ZERO_DTYPES = {8: torch.int16, 4: torch.uint8}  # int8 zeros: signed value (GPTQ v1's +1 can reach 128)
Q_DTYPES = {8: torch.int8, 4: torch.uint8}


class QuantizedLinear(nn.Module):
    """y = x @ W.T + bias with W = (q - zero) * scale per (output row, group); see kernels/quant_cpu.py."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bits: int,
                 group_size: int, in_features: int, bias: Optional[torch.Tensor] = None,
                 in_perm: Optional[torch.Tensor] = None, name: str = "weight"):
        super().__init__()
        N, G = scales.shape
        width = G * group_size // (2 if bits == 4 else 1)
        if (bits not in Q_DTYPES or qweight.dtype != Q_DTYPES.get(bits) or tuple(qweight.shape) != (N, width)
                or in_features > G * group_size or in_features <= (G - 1) * group_size
                or (zeros is not None and (tuple(zeros.shape) != (N, G) or zeros.dtype != ZERO_DTYPES[bits]))
                or (bias is not None and tuple(bias.shape) != (N,))
                or (in_perm is not None and tuple(in_perm.shape) != (in_features,))):
            raise CheckpointError(
                f"{name}: inconsistent quantized tensors: qweight {tuple(qweight.shape)} {qweight.dtype}, scales "
                f"{tuple(scales.shape)}, zeros {None if zeros is None else (tuple(zeros.shape), zeros.dtype)}, "
                f"bias {None if bias is None else tuple(bias.shape)}, bits {bits}, group_size {group_size}, "
                f"in_features {in_features}")
        self.bits, self.group_size, self.in_features, self.out_features = bits, group_size, in_features, N
        self.register_buffer("qweight", qweight.contiguous())  # (N, Kp) int8 or (N, Kp/2) uint8
        self.register_buffer("scales", scales.to(torch.float32).contiguous())  # (N, G)
        self.register_buffer("zeros", None if zeros is None else zeros.contiguous())  # (N, G) or None: symmetric
        self.register_buffer("bias", bias)  # (N,) float or None
        self.register_buffer("in_perm", None if in_perm is None else in_perm.to(torch.long))  # (K,) or None

    def forward(self, x: torch.Tensor, act: Optional[str] = None) -> torch.Tensor:
        if self.in_perm is not None:
            x = x.index_select(-1, self.in_perm)
        if x.is_cuda:
            from mmfuse.kernels.quant_triton import quant_linear_cuda
            return quant_linear_cuda(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.bias, act)
        return quant_linear(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.bias, act)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight (N, K) in the original input-column order."""
        w = dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features, dtype)
        return w if self.in_perm is None else torch.empty_like(w).index_copy_(1, self.in_perm, w)

    def rows(self, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Rows `ids` (any shape) of the float weight: an embedding lookup. -> (*ids.shape, K)"""
        flat = ids.reshape(-1)
        w = dequantize(self.qweight[flat], self.scales[flat], None if self.zeros is None else self.zeros[flat],
                       self.bits, self.group_size, self.in_features, dtype)
        if self.in_perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.in_perm, w)
        return w.view(*ids.shape, self.in_features)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.zeros is None}, bias={self.bias is not None}, "
                f"act_order={self.in_perm is not None}")

    @classmethod
    def concat(cls, parts: Sequence["QuantizedLinear"], name: str = "weight") -> "QuantizedLinear":
        """Stack the outputs of linears over the same input (q/k/v, gate/up) into one."""
        p0 = parts[0]
        same = all(p.bits == p0.bits and p.group_size == p0.group_size and p.in_features == p0.in_features
                   and (p.zeros is None) == (p0.zeros is None) and (p.bias is None) == (p0.bias is None)
                   and (p.in_perm is None) == (p0.in_perm is None)
                   and (p.in_perm is None or torch.equal(p.in_perm, p0.in_perm)) for p in parts)
        if not same:
            raise CheckpointError(f"{name}: the parts to fuse differ in bits, group size, zero points, bias or "
                                  "activation order (g_idx); mmfuse fuses only parts quantized alike")

        def cat(attr):
            return None if getattr(p0, attr) is None else torch.cat([getattr(p, attr) for p in parts])

        return cls(cat("qweight"), cat("scales"), cat("zeros"), p0.bits, p0.group_size, p0.in_features,
                   cat("bias"), p0.in_perm, name=name)


class QuantizedEmbedding(nn.Module):
    """A token embedding looked up in a `QuantizedLinear`'s weight (the tied LM head, or its own)."""

    def __init__(self, table: QuantizedLinear, dtype: torch.dtype):
        super().__init__()
        self.table, self.dtype = table, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids, self.dtype)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = True,
                    bias: Optional[torch.Tensor] = None) -> QuantizedLinear:
    """Round-to-nearest quantization of a float weight (N, K), per output row and group of input columns.

    Symmetric: scale = max|w| / 127 (int8) or / 7 (int4), zero fixed (0 / 8). Asymmetric: the
    group's range [min(w, 0), max(w, 0)] over 2^bits - 1 steps, an integer zero point. Columns
    padded to a whole last group are zeros, which quantize exactly to the zero point."""
    N, K = w.shape
    g = K if group_size == -1 else group_size
    if bits == 4 and g % 2:
        g += 1  # a byte holds two columns of one group
    G = -(-K // g)
    wg = F.pad(w.detach().to(torch.float32), (0, G * g - K)).view(N, G, g)
    if symmetric:
        qmax = 127 if bits == 8 else 7
        s = wg.abs().amax(-1) / qmax  # (N, G)
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(wg / s[..., None]).clamp(-qmax - 1, qmax)
        zeros = None
        q = q if bits == 8 else q + 8
    else:
        levels = 2 ** bits - 1
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        s = (hi - lo) / levels
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.round(-lo / s).clamp(0, levels)
        q = (torch.round(wg / s[..., None]) + z[..., None]).clamp(0, levels)
        if bits == 8:
            q, z = q - 128, z - 128
        zeros = z.to(ZERO_DTYPES[bits])
    q = q.reshape(N, G * g)
    qweight = q.to(torch.int8) if bits == 8 else pack_int4(q.to(torch.uint8), g)
    return QuantizedLinear(qweight, s, zeros, bits, g, K, None if bias is None else bias.detach().clone())
