"""A small VQ image tokenizer for the world's 64 x 64 scenes: images <-> a grid of discrete codes.

Encoder: a strided conv stem and residual 3x3 convs to one vector per `patch` x `patch` pixels.
Quantizer: factorised codes (as in ViT-VQGAN): each vector is projected to a low dimension and
l2-normalised, then replaced by its nearest codebook entry (cosine); the straight-through
estimator passes gradients around the lookup, a codebook and a commitment loss train both sides,
and unused codes are restarted on encoder outputs during training. Decoder: residual convs on the
code grid, a pixel shuffle back to full resolution and one 3x3 conv to per-pixel logits over the
world's colours (background + palette): the world has a fixed palette, so decoding picks a colour
per pixel instead of regressing RGB, and reconstructions are flat like the renders.

Saved as vq.safetensors + vq.json (the `VQConfig` fields) in a model folder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ImageError, MissingModelError
from ..files import atomic_path, write_json
from ..jsonfile import read_json
from .scene import BACKGROUND, IMAGE_SIZE, PALETTE

WEIGHTS, CONFIG = "vq.safetensors", "vq.json"


@dataclass
class VQConfig:
    image_size: int = IMAGE_SIZE       # pixels per side
    patch: int = 8                     # pixels per code side: (image_size / patch)^2 codes per image
    stem: int = 32                     # channels of the half-resolution conv stem
    width: int = 128                   # channels on the code grid
    layers: int = 2                    # residual 3x3 conv blocks on the code grid, encoder and decoder each
    codebook_size: int = 512           # number of codes
    code_dim: int = 16                 # dimension of the l2-normalised lookup space
    beta: float = 0.25                 # commitment loss weight
    colours: list = field(default_factory=lambda: [list(BACKGROUND)] + [list(c) for c in PALETTE.values()])  # RGB per output class

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def tokens(self) -> int:
        return self.grid ** 2


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.gelu(self.conv1(F.gelu(x))))


class VQTokenizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        if cfg.image_size % cfg.patch or cfg.patch % 2:
            raise CheckpointError(f"VQConfig: patch {cfg.patch} must be even and divide image_size {cfg.image_size}")
        self.cfg = cfg
        c, k = cfg.width, len(cfg.colours)
        self.stem = nn.Conv2d(3, cfg.stem, 3, stride=2, padding=1)                  # (B, stem, H/2, W/2)
        self.down = nn.Conv2d(cfg.stem, c, cfg.patch // 2, stride=cfg.patch // 2)   # (B, c, g, g)
        self.enc = nn.Sequential(*[ResBlock(c) for _ in range(cfg.layers)])
        self.to_code = nn.Conv2d(c, cfg.code_dim, 1)
        self.codebook = nn.Parameter(torch.randn(cfg.codebook_size, cfg.code_dim))
        self.from_code = nn.Conv2d(cfg.code_dim, c, 1)
        self.dec = nn.Sequential(*[ResBlock(c) for _ in range(cfg.layers)])
        self.up = nn.Conv2d(c, cfg.stem // 2 * cfg.patch ** 2, 1)                   # pixel shuffle to (B, stem/2, H, W)
        self.out = nn.Conv2d(cfg.stem // 2, k, 3, padding=1)                        # (B, classes, H, W)
        self.register_buffer("palette", torch.tensor(cfg.colours, dtype=torch.uint8), persistent=False)

    # --- pieces ----------------------------------------------------------------------------------
    def pixels_in(self, images) -> torch.Tensor:
        """uint8 (B, H, W, 3) array/tensor -> float (B, 3, H, W) in [-1, 1], checked."""
        x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        s = self.cfg.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (s, s, 3):
            raise ImageError(f"VQ tokenizer: images of shape {tuple(x.shape)}, expected (B, {s}, {s}, 3) uint8")
        return x.to(self.codebook.device).permute(0, 3, 1, 2).float() / 127.5 - 1

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> l2-normalised (B, g, g, code_dim)."""
        z = self.to_code(self.enc(self.down(F.gelu(self.stem(x)))))
        return F.normalize(z.permute(0, 2, 3, 1), dim=-1)

    def codes_of(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code (cosine) of each latent: (..., code_dim) -> (...) int64."""
        return (z @ F.normalize(self.codebook, dim=-1).T).argmax(-1)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1)[codes]  # (..., code_dim)

    def logits(self, q: torch.Tensor) -> torch.Tensor:
        """Quantised latents (B, g, g, code_dim) -> per-pixel colour logits (B, classes, H, W)."""
        h = self.dec(self.from_code(q.permute(0, 3, 1, 2)))
        return self.out(F.gelu(F.pixel_shuffle(self.up(h), self.cfg.patch)))

    def forward(self, x: torch.Tensor) -> tuple:
        """Training pass: (colour logits (B, classes, H, W), vq loss, codes (B, g, g))."""
        z = self.latents(x)
        codes = self.codes_of(z)
        e = self.embed_codes(codes)
        vq = F.mse_loss(e, z.detach()) + self.cfg.beta * F.mse_loss(z, e.detach())
        q = z + (e - z).detach()  # straight-through
        return self.logits(q), vq, codes

    # --- public API --------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> codes (B, g, g) int64."""
        return self.codes_of(self.latents(self.pixels_in(images)))

    @torch.inference_mode()
    def decode(self, codes) -> np.ndarray:
        """codes (B, g, g) (or (B, g*g)) -> uint8 images (B, H, W, 3) in the world's colours."""
        codes = torch.as_tensor(codes, device=self.codebook.device).long()
        g, n = self.cfg.grid, self.cfg.codebook_size
        if codes.dim() == 2:
            codes = codes.reshape(codes.shape[0], g, g) if codes.shape[1] == g * g else codes
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (g, g):
            raise ValueError(f"VQ decode: codes of shape {tuple(codes.shape)}, expected (B, {g}, {g}) or (B, {g * g})")
        if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < n):
            raise ValueError(f"VQ decode: codes outside [0, {n})")
        cls = self.logits(self.embed_codes(codes)).argmax(1)  # (B, H, W)
        return self.palette.to(cls.device)[cls].cpu().numpy()

    def save(self, folder) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / WEIGHTS) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        write_json(folder / CONFIG, asdict(self.cfg))
        return folder

    @classmethod
    def load(cls, folder, device="cpu") -> "VQTokenizer":
        """The tokenizer saved in `folder` (vq.json + vq.safetensors), in eval mode."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for f in (CONFIG, WEIGHTS):
            if not (folder / f).is_file():
                raise MissingModelError(f"VQ tokenizer: {folder / f} is missing")
        raw = read_json(folder / CONFIG)
        known = {f.name for f in fields(VQConfig)}
        if not isinstance(raw, dict) or set(raw) - known:
            raise CheckpointError(f"{folder / CONFIG}: unknown keys {sorted(set(raw) - known)} (VQConfig fields: {sorted(known)})")
        model = cls(VQConfig(**raw))
        state = load_file(str(folder / WEIGHTS))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{folder / WEIGHTS} does not match {folder / CONFIG}: {e}") from None
        return model.to(device).eval()


def colour_classes(images: np.ndarray, colours) -> torch.Tensor:
    """uint8 (B, H, W, 3) renders -> (B, H, W) int64 index of each pixel's nearest colour."""
    c = np.asarray(colours, dtype=np.int32)  # (K, 3)
    d = ((images[:, :, :, None, :].astype(np.int32) - c) ** 2).sum(-1)  # (B, H, W, K)
    return torch.from_numpy(d.argmin(-1))


@dataclass
class VQTrainConfig:
    steps: int = 1500              # optimizer steps
    batch: int = 64                # images per step
    lr: float = 2e-3               # AdamW peak learning rate (warm-up then cosine)
    restart_every: int = 50        # steps between restarts of codes unused since the last restart (0: never)
    seed: int = 0                  # init, batch order and restarts
    progress: bool = True


def train_vq(images: np.ndarray, cfg: VQTrainConfig, vq_cfg: VQConfig = VQConfig(), device="cpu") -> tuple:
    """Train a `VQTokenizer` on uint8 renders (N, H, W, 3); returns (model in eval mode, losses)."""
    from tqdm import tqdm

    from ..optim import OptimConfig, lr_at, make_optimizer

    torch.manual_seed(cfg.seed)
    model = VQTokenizer(vq_cfg).to(device)
    targets = colour_classes(images, vq_cfg.colours)  # (N, H, W)
    data = torch.from_numpy(images)
    oc = OptimConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=max(1, cfg.steps // 20), weight_decay=0.0)
    opt = make_optimizer(model, oc)
    gen = torch.Generator().manual_seed(cfg.seed)
    used = torch.zeros(vq_cfg.codebook_size, dtype=torch.bool, device=device)
    losses = []
    model.train()
    for step in tqdm(range(cfg.steps), disable=not cfg.progress, desc="vq", dynamic_ncols=True):
        idx = torch.randint(len(data), (cfg.batch,), generator=gen)
        x = model.pixels_in(data[idx])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, oc)
        logits, vq, codes = model(x)
        loss = F.cross_entropy(logits, targets[idx].to(device)) + vq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        used[codes.flatten()] = True
        if cfg.restart_every and (step + 1) % cfg.restart_every == 0 and step + 1 < cfg.steps * 0.8:
            dead = (~used).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    z = model.latents(x).reshape(-1, vq_cfg.code_dim)
                    pick = torch.randint(len(z), (len(dead),), generator=gen).to(device)
                    model.codebook[dead] = z[pick] + 0.01 * torch.randn(len(dead), vq_cfg.code_dim, generator=gen).to(device)
            used.zero_()
    return model.eval(), losses
