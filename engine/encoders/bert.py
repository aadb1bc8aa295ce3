"""BERT-family text encoder (`BertModel` checkpoints) and sentence embeddings.

ids (B, T) right-padded, lengths (B,) -> word + token-type + position embeddings -> LayerNorm ->
post-LN blocks (engine/layers.Block with prenorm=False; padding hidden from attention through
`kv_len`) -> token states (B, T, C). `SentenceEncoder` adds sentence-transformers' pooling
(mean over real tokens, or the [CLS] token) and L2 normalisation, read from the folder's
modules.json and 1_Pooling/config.json when present (all-MiniLM-L6-v2 layout).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import Checkpoint, path_in_folder
from ..jsonfile import read_config, read_json
from ..errors import ConfigError
from ..nn.layers import Block, make_norm
from ..weight_map import load_weights, module_keys
from .config import TowerConfig, bert_tower
from .weights import block_keys


class BertEncoder(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_positions, cfg.d_model))
        self.norm_embed = make_norm(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))

    @staticmethod
    def key_table(cfg: TowerConfig, p: str = "") -> list:
        return [("tok_embed.weight", [p + "embeddings.word_embeddings.weight"]),
                ("type_embed.weight", [p + "embeddings.token_type_embeddings.weight"]),
                ("pos_embed", [p + "embeddings.position_embeddings.weight"]),
                *module_keys("norm_embed", p + "embeddings.LayerNorm"),
                *block_keys("blocks", p + "encoder.layer", cfg.n_layer, "bert")]

    @classmethod
    def from_pretrained(cls, folder, dtype="auto", device="cpu") -> "BertEncoder":
        folder = Path(folder)
        cfg = bert_tower(read_config(folder), str(folder / "config.json"))
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in Checkpoint(folder) else ""
        model = load_weights(lambda: cls(cfg), folder, cls.key_table(cfg, prefix), dtype=dtype, device=device,
                             ignore=("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"))
        return model.eval()

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, type_ids=None) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) real tokens per row -> token states (B, T, C)."""
        B, T = ids.shape
        if T > self.cfg.max_positions:
            raise ValueError(f"text of {T} tokens exceeds the context length {self.cfg.max_positions}")
        type_ids = torch.zeros_like(ids) if type_ids is None else type_ids
        x = self.norm_embed(self.tok_embed(ids) + self.type_embed(type_ids) + self.pos_embed[:T])  # (B, T, C)
        for block in self.blocks:  # (attention drops the mask itself when no row is padded)
            x = block(x, causal=False, kv_len=lengths)
        return x


class SentenceEncoder(nn.Module):
    """A BERT encoder with sentence-transformers' pooling and normalisation."""

    def __init__(self, encoder: BertEncoder, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"unsupported sentence pooling {pooling!r} (supported: mean, cls)")
        self.encoder, self.pooling, self.normalize = encoder, pooling, normalize

    @classmethod
    def from_pretrained(cls, folder, dtype="auto", device="cpu") -> "SentenceEncoder":
        folder = Path(folder)
        pooling, normalize = "mean", True
        modules = folder / "modules.json"
        if modules.is_file():
            try:
                mods = json.loads(modules.read_text(encoding="utf-8"))
                types = [m["type"].rsplit(".", 1)[-1] for m in mods]
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConfigError(f"{modules}: not a sentence-transformers modules list ({e})") from None
            normalize = "Normalize" in types
            pool_dir = next((m.get("path", "") for m in mods if m["type"].endswith("Pooling")), None)
            if pool_dir:
                pool_dir = path_in_folder(folder, pool_dir, f"{modules}: Pooling module path").relative_to(folder)
            pcfg = read_json(folder / pool_dir / "config.json", required=False) if pool_dir else None
            if pcfg:
                modes = [k[len("pooling_mode_"):] for k, v in pcfg.items() if k.startswith("pooling_mode_") and v]
                if modes not in (["mean_tokens"], ["cls_token"]):
                    raise ConfigError(f"{folder / pool_dir / 'config.json'}: pooling modes {modes} are not supported "
                                      "(supported: mean_tokens or cls_token alone)")
                pooling = "mean" if modes == ["mean_tokens"] else "cls"
        return cls(BertEncoder.from_pretrained(folder, dtype, device), pooling, normalize)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, type_ids=None) -> torch.Tensor:
        """ids (B, T), lengths (B,) [, token types (B, T)] -> sentence embeddings (B, C)."""
        h = self.encoder(ids, lengths, type_ids)  # (B, T, C)
        if self.pooling == "cls":
            e = h[:, 0]
        else:
            mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).to(h.dtype)  # (B, T)
            e = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(e, dim=-1) if self.normalize else e
