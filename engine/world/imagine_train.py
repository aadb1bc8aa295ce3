"""Train the world's text-to-image model (`mmfuse world train`, stage "imagine"): first the VQ
tokenizer on the training renders, then a Llama decoder with the decoder loop (`decoder.train`)
on <s> caption <boi> <img...> sequences, loss on the image tokens only. A fraction of the
captions is dropped (<s> <boi> <img...>), so the same model gives the unconditional logits that
classifier-free guidance needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..decoder.train import DecoderTrainConfig, llama_decoder_config, pad_batch, train_decoder
from ..decoder.transformer import Decoder
from ..files import write_json
from ..nn.layers import init_weights
from .imagine import image_token, imagine_tokenizer, prompt_ids
from .models import BOS, EOS, PAD, write_chat_assets
from .vq import VQConfig, VQTrainConfig, train_vq


@dataclass
class ImagineTrainConfig:
    vq: VQTrainConfig = field(default_factory=lambda: VQTrainConfig(steps=1200, batch=32))  # tokenizer training
    vq_sizes: VQConfig = field(default_factory=lambda: VQConfig(width=64, layers=1, mask_codes=512))
    steps: int = 2000              # decoder optimizer steps
    batch: int = 32                # sequences per step
    lr: float = 3e-3
    caption_dropout: float = 0.1   # fraction of sequences trained without their caption (for guidance)
    width: int = 128               # decoder d_model
    layers: int = 4
    heads: int = 4
    ff: int = 384
    context: int = 128             # positions: <s> + the longest caption (35 words) + <boi> + 64 image tokens fit
    guidance: float = 1.5          # sampling defaults written to generation_config.json (guidance_scale)
    temperature: float = 0.3
    top_k: int = 0
    seed: int = 0


def image_sequences(batch_size: int, tok, captions: list, codes: torch.Tensor, cfg: ImagineTrainConfig, first_image_id: int):
    """Endless shuffled batches (ids (B, T), labels (B, T)): <s> caption <boi> codes, labels on the codes."""
    rng = np.random.default_rng(cfg.seed + 3)
    pad = tok.token_to_id(PAD)
    prompts = [prompt_ids(tok, c) for c in captions]
    empty = prompt_ids(tok, None)
    image_ids = (codes.reshape(len(codes), -1) + first_image_id).tolist()
    while True:
        order = rng.permutation(len(captions))
        for s in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[s:s + batch_size]
            drop = rng.random(batch_size) < cfg.caption_dropout
            heads = [empty if d else prompts[i] for i, d in zip(idx, drop)]
            rows = [h + image_ids[i] for h, i in zip(heads, idx)]
            yield pad_batch(rows, pad, [len(h) for h in heads])


def write_generation_config(folder, cfg: ImagineTrainConfig, dcfg) -> None:
    """generation_config.json: the sampling defaults of `cfg` (guidance_scale as transformers names it)."""
    write_json(Path(folder) / "generation_config.json", {
        "do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k, "guidance_scale": cfg.guidance,
        "bos_token_id": dcfg.bos_token_id, "eos_token_id": dcfg.eos_token_ids[0]})


def train_imagine(cfg: ImagineTrainConfig, folder, images: np.ndarray, captions: list, device="cpu",
                  progress: bool = True) -> tuple:
    """Train the VQ tokenizer and the decoder on (renders (N, H, W, 3) uint8, captions); write the
    model folder; returns (vq, decoder, losses)."""
    folder = Path(folder)
    vq, _ = train_vq(images, VQTrainConfig(**{**cfg.vq.__dict__, "progress": progress}), cfg.vq_sizes, device=device)
    with torch.inference_mode():
        codes = torch.cat([vq.encode(images[s:s + 256]) for s in range(0, len(images), 256)]).cpu()
    tok = imagine_tokenizer(cfg.vq_sizes.codebook_size)
    first = tok.token_to_id(image_token(0))
    dcfg = llama_decoder_config(tok.get_vocab_size(), cfg.width, cfg.layers, cfg.heads, cfg.ff, cfg.context,
                                bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS))
    torch.manual_seed(cfg.seed)
    model = Decoder(dcfg)
    init_weights(model)
    model.to(device)
    tc = DecoderTrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=max(1, cfg.steps // 20), weight_decay=0.01,
                            betas=(0.9, 0.95), eps=1e-8, progress=progress, desc="imagine")
    batches = ((i.to(device), l.to(device)) for i, l in image_sequences(cfg.batch, tok, captions, codes, cfg, first))
    losses = train_decoder(model, batches, tc)
    model.cpu().save_pretrained(folder)
    write_chat_assets(folder, tok, chat_template=False)
    write_generation_config(folder, cfg, dcfg)
    vq.cpu().save(folder)
    return vq, model, losses
