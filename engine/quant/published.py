"""Published quantized checkpoints: GPTQ and AWQ (GEMM) tensors unpacked into `QuantizedLinear`.

GPTQ (AutoGPTQ / GPTQModel / transformers, `quant_method: "gptq"`), per linear layer of K inputs
and N outputs, w = 32 // bits values per int32, least significant bits first:
- qweight int32 (K / w, N): packed along the input dimension;
- qzeros int32 (G, N / w): packed along the output dimension; format "gptq" (v1) stores
  zero - 1, so readers add 1 after masking (AutoGPTQ's `qlinear_cuda_old` and GPTQModel's
  `unpack_gptq_qzeros` do exactly this, so a v1 zero of 0 reads as 16); "gptq_v2" stores the zero;
- scales fp16 (G, N); g_idx int32 (K,), the group of each input column (desc_act / act-order
  scatters the groups; otherwise g_idx[i] = i // group_size);
- W[:, i] = scales[g_idx[i]] * (q[i] - zeros[g_idx[i]]) per output column.
AWQ GEMM (`quant_method: "awq"`, `version: "gemm"`, AutoAWQ's `awq/utils/packing_utils.py`):
qweight int32 (K, N / 8) and qzeros int32 (G, N / 8) both packed along the output dimension in
the interleaved order [0, 2, 4, 6, 1, 3, 5, 7] (the int32's nibble i holds column 8c + ORDER[i]);
scales fp16 (G, N); W = (q - zero) * scale, no +1.
Columns are stored sorted by group, so act-order checkpoints need one input gather (`in_perm`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mmfuse.kernels.quant_cpu import pack_int4

from ..checkpoint import Checkpoint
from ..jsonfile import read_json
from ..errors import CheckpointError, ConfigError
from .linear import ZERO_DTYPES, QuantizedLinear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column ORDER[i] of its 8


@dataclass(frozen=True)
class PublishedQuant:
    """The quantization_config of a GPTQ or AWQ checkpoint, checked."""

    method: str  # "gptq" or "awq"
    bits: int  # 4 or 8 (AWQ: 4)
    group_size: int  # -1: one group over all inputs
    desc_act: bool = False  # GPTQ act-order: groups scattered over the input columns (g_idx)
    sym: bool = True  # informational: the zeros are stored either way
    v1_zeros: bool = True  # GPTQ checkpoint_format "gptq": stored zero = zero - 1
    lm_head: bool = False  # the LM head is quantized too

    @property
    def name(self) -> str:
        return f"{self.method}-{self.bits}bit-g{self.group_size}{'-actorder' if self.desc_act else ''}"


def published_quant(folder, config: dict) -> Optional[dict]:
    """The raw quantization_config of a checkpoint: config.json's, else quantize_config.json (older
    AutoGPTQ exports, which imply GPTQ); None for a float checkpoint."""
    qc = config.get("quantization_config")
    if qc is None:
        qc = read_json(Path(folder) / "quantize_config.json", required=False)
        if qc is not None:
            qc = {"quant_method": "gptq", **qc}
    if qc is not None and not isinstance(qc, dict):
        raise ConfigError(f"{folder}/config.json: quantization_config must be an object")
    return qc


def parse_published(qc: dict, source: str) -> PublishedQuant:
    method = str(qc.get("quant_method", "")).lower()
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size", -1))
    if method not in ("gptq", "awq"):
        raise ConfigError(f"{source}: unsupported quant_method {qc.get('quant_method')!r} (mmfuse reads gptq, awq, mmfuse)")
    if not isinstance(bits, int) or not isinstance(group, int) or (group != -1 and group < 2):
        raise ConfigError(f"{source}: quantization_config needs integer bits and group_size, got {bits!r}, {group!r}")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or bits != 4:
            raise ConfigError(f"{source}: AWQ version {version!r} with {bits} bits is not supported (only GEMM, 4 bits)")
        return PublishedQuant("awq", 4, group, sym=not qc.get("zero_point", True))
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if bits not in (4, 8) or fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"{source}: GPTQ with bits={bits}, checkpoint_format={fmt!r} is not supported "
                          "(4 or 8 bits, format gptq or gptq_v2)")
    return PublishedQuant("gptq", bits, group, desc_act=bool(qc.get("desc_act", False)), sym=bool(qc.get("sym", True)),
                          v1_zeros=fmt == "gptq", lm_head=bool(qc.get("lm_head", False)))


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their 32 // bits fields (least significant first) laid out along `dim`, as int32."""
    w = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    p = packed.to(torch.int32)
    if dim == 0:  # (R, C) -> (R * w, C)
        v = (p[:, None, :] >> shifts[None, :, None]) & (2 ** bits - 1)
        return v.reshape(p.shape[0] * w, p.shape[1])
    v = (p[:, :, None] >> shifts[None, None, :]) & (2 ** bits - 1)  # (R, C) -> (R, C * w)
    return v.reshape(p.shape[0], p.shape[1] * w)


def _from_columns(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                  group: int, bias, name: str) -> QuantizedLinear:
    """Integer weights q (K, N), zeros (G, N), scales (G, N), g_idx (K,) -> QuantizedLinear."""
    K, N = q.shape
    G = scales.shape[0]
    perm = torch.argsort(g_idx, stable=True)
    if bool((g_idx[perm] != torch.arange(K) // group).any()) or G != -(-K // group):
        raise CheckpointError(f"{name}: g_idx does not form groups of {group} input columns (G = {G}); "
                              "mmfuse reads GPTQ act-order only with groups of group_size columns")
    in_perm = None if bool((perm == torch.arange(K)).all()) else perm
    q = q[perm].t()  # (N, K), columns sorted by group
    Kp = G * group
    pad = torch.zeros(N, Kp - K, dtype=q.dtype)
    zt = zeros.t().contiguous()  # (N, G)
    if Kp > K:  # padded columns hold the zero point: they dequantize to 0
        pad = zt[:, -1:].to(q.dtype).expand(N, Kp - K)
    q = torch.cat([q, pad], dim=1)
    st = scales.t().to(torch.float32).contiguous()
    if bits == 8:
        return QuantizedLinear((q - 128).to(torch.int8), st, (zt - 128).to(ZERO_DTYPES[8]), 8, group, K, bias,
                               in_perm, name=name)
    if bool((zt > 15).any()):  # GPTQ v1 zero of 0 read as 16: int4 storage holds up to 15, so keep it exact in int8
        return QuantizedLinear((q - 128).to(torch.int8), st, (zt - 128).to(ZERO_DTYPES[8]), 8, group, K, bias,
                               in_perm, name=name)
    return QuantizedLinear(pack_int4(q, group), st, zt.to(ZERO_DTYPES[4]), 4, group, K, bias, in_perm, name=name)


def read_linear(ck: Checkpoint, spec: PublishedQuant, prefix: str, n_out: int, n_in: int,
                dtype: torch.dtype) -> QuantizedLinear:
    """The quantized linear `prefix` (e.g. "model.layers.0.self_attn.q_proj") of a GPTQ/AWQ checkpoint."""
    bits = spec.bits
    group = n_in if spec.group_size == -1 else spec.group_size
    if bits == 4 and group % 2:
        raise CheckpointError(f"{ck.folder}: {prefix}: 4-bit groups of an odd size ({group}) are not supported")
    G = -(-n_in // group)
    w = 32 // bits
    name = f"{ck.folder}: {prefix}"
    bias = ck.take(prefix + ".bias", (n_out,), dtype=dtype) if prefix + ".bias" in ck else None
    scales = ck.take(prefix + ".scales", (G, n_out)).to(torch.float32)
    if spec.method == "awq":
        qweight = ck.take(prefix + ".qweight", (n_in, n_out // 8))
        qzeros = ck.take(prefix + ".qzeros", (G, n_out // 8))
        inverse = torch.tensor(AWQ_ORDER).argsort()  # column j of 8 sits in nibble inverse[j]
        order = (torch.arange(n_out // 8)[:, None] * 8 + inverse[None, :]).reshape(-1)
        q = unpack_int32(qweight, 4, dim=1)[:, order]  # (K, N)
        zeros = unpack_int32(qzeros, 4, dim=1)[:, order]  # (G, N)
        return _from_columns(q, zeros, scales, torch.arange(n_in) // group, 4, group, bias, name)
    qweight = ck.take(prefix + ".qweight", (-(-n_in // w), n_out))
    qzeros = ck.take(prefix + ".qzeros", (G, -(-n_out // w)))
    q = unpack_int32(qweight, bits, dim=0)[:n_in]  # (K, N)
    zeros = unpack_int32(qzeros, bits, dim=1)[:, :n_out] + (1 if spec.v1_zeros else 0)  # (G, N)
    if prefix + ".g_idx" in ck:
        g_idx = ck.take(prefix + ".g_idx", (n_in,)).to(torch.long)
    else:
        g_idx = torch.arange(n_in) // group
    if bool(((g_idx < 0) | (g_idx >= G)).any()):
        raise CheckpointError(f"{name}.g_idx: group indices outside 0..{G - 1}")
    return _from_columns(q, zeros, scales, g_idx, bits, group, bias, name)
