"""A small VQ image tokenizer for the world's 64 x 64 scenes: images <-> a grid of discrete codes.

The world has a fixed palette and every `patch` x `patch` block lies inside one grid cell, so it
holds at most one object colour: a code is factorised into (colour, shape code). The colour is
the block's most frequent palette colour (or the background); the shape code is learned, colour
blind, on the block's foreground mask, so one mask codebook serves every colour:

- encoder: a strided conv stem and residual 3x3 convs, from the foreground mask to one vector per
  block; quantizer: each vector is projected to a low dimension and l2-normalised (ViT-VQGAN's
  factorised lookup), then replaced by its nearest mask code (cosine); the straight-through
  estimator passes gradients around the lookup, a codebook and a commitment loss train both
  sides, and unused codes are restarted on encoder outputs during training;
- decoder: residual convs on the code grid, a pixel shuffle back to full resolution and one 3x3
  conv to a foreground logit per pixel; foreground pixels take their block's colour, so
  reconstructions are flat like the renders.

Code of a block = colour index * mask_codes + mask code, colour index 0 being the background.

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
from .scene import BACKGROUND, CELL, IMAGE_SIZE, PALETTE

WEIGHTS, CONFIG = "vq.safetensors", "vq.json"


@dataclass
class VQConfig:
    image_size: int = IMAGE_SIZE       # pixels per side
    patch: int = 8                     # pixels per code side: (image_size / patch)^2 codes per image
    stem: int = 32                     # channels of the half-resolution conv stem
    width: int = 128                   # channels on the code grid
    layers: int = 2                    # residual 3x3 conv blocks on the code grid, encoder and decoder each
    mask_codes: int = 256              # shape codes; codes per image position: len(colours) * mask_codes
    code_dim: int = 16                 # dimension of the l2-normalised lookup space
    beta: float = 0.25                 # commitment loss weight
    colours: list = field(default_factory=lambda: [list(BACKGROUND)] + [list(c) for c in PALETTE.values()])  # RGB per output class

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def tokens(self) -> int:
        return self.grid ** 2

    @property
    def codebook_size(self) -> int:
        return len(self.colours) * self.mask_codes


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
        if CELL % cfg.patch or cfg.patch % 2:
            raise CheckpointError(f"VQConfig: patch {cfg.patch} must be even and divide the grid cell ({CELL} pixels)")
        self.cfg = cfg
        c = cfg.width
        self.stem = nn.Conv2d(1, cfg.stem, 3, stride=2, padding=1)                  # (B, stem, H/2, W/2)
        self.down = nn.Conv2d(cfg.stem, c, cfg.patch // 2, stride=cfg.patch // 2)   # (B, c, g, g)
        self.enc = nn.Sequential(*[ResBlock(c) for _ in range(cfg.layers)])
        self.to_code = nn.Conv2d(c, cfg.code_dim, 1)
        self.codebook = nn.Parameter(torch.randn(cfg.mask_codes, cfg.code_dim))
        self.from_code = nn.Conv2d(cfg.code_dim, c, 1)
        self.dec = nn.Sequential(*[ResBlock(c) for _ in range(cfg.layers)])
        self.up = nn.Conv2d(c, cfg.stem // 2 * cfg.patch ** 2, 1)                   # pixel shuffle to (B, stem/2, H, W)
        self.out = nn.Conv2d(cfg.stem // 2, 1, 3, padding=1)                        # (B, 1, H, W) foreground logit
        self.register_buffer("palette", torch.tensor(cfg.colours, dtype=torch.uint8), persistent=False)

    # --- pieces ----------------------------------------------------------------------------------
    def classes_in(self, images) -> torch.Tensor:
        """uint8 (B, H, W, 3) array/tensor -> (B, H, W) int64 nearest colour (0: background), checked."""
        x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
        s = self.cfg.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (s, s, 3):
            raise ImageError(f"VQ tokenizer: images of shape {tuple(x.shape)}, expected (B, {s}, {s}, 3) uint8")
        d = ((x[:, :, :, None, :].int() - self.palette.int()) ** 2).sum(-1)  # (B, H, W, K)
        return d.argmin(-1).to(self.codebook.device)

    def block_colours(self, classes: torch.Tensor) -> torch.Tensor:
        """(B, H, W) colour classes -> (B, g, g): each block's most frequent non-background colour, else 0."""
        p, k = self.cfg.patch, len(self.cfg.colours)
        blocks = F.one_hot(classes, k).float().permute(0, 3, 1, 2)  # (B, K, H, W)
        counts = F.avg_pool2d(blocks, p) * p * p  # (B, K, g, g)
        counts[:, 0] = 0.5  # background only where no colour has a pixel
        return counts.argmax(1)

    def latents(self, fg: torch.Tensor) -> torch.Tensor:
        """Foreground mask (B, 1, H, W) float -> l2-normalised (B, g, g, code_dim)."""
        z = self.to_code(self.enc(self.down(F.gelu(self.stem(fg * 2 - 1)))))
        return F.normalize(z.permute(0, 2, 3, 1), dim=-1)

    def mask_codes_of(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest mask code (cosine) of each latent: (..., code_dim) -> (...) int64."""
        return (z @ F.normalize(self.codebook, dim=-1).T).argmax(-1)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1)[codes]  # (..., code_dim)

    def mask_logits(self, q: torch.Tensor) -> torch.Tensor:
        """Quantised latents (B, g, g, code_dim) -> foreground logits (B, H, W)."""
        h = self.dec(self.from_code(q.permute(0, 3, 1, 2)))
        return self.out(F.gelu(F.pixel_shuffle(self.up(h), self.cfg.patch)))[:, 0]

    def forward(self, fg: torch.Tensor) -> tuple:
        """Training pass on foreground masks (B, 1, H, W): (foreground logits (B, H, W), vq loss, mask codes (B, g, g))."""
        z = self.latents(fg)
        m = self.mask_codes_of(z)
        e = self.embed_codes(m)
        vq = F.mse_loss(e, z.detach()) + self.cfg.beta * F.mse_loss(z, e.detach())
        q = z + (e - z).detach()  # straight-through
        return self.mask_logits(q), vq, m

    # --- public API --------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> codes (B, g, g) int64 in [0, codebook_size)."""
        classes = self.classes_in(images)
        m = self.mask_codes_of(self.latents((classes > 0).float()[:, None]))
        return self.block_colours(classes) * self.cfg.mask_codes + m

    @torch.inference_mode()
    def decode(self, codes) -> np.ndarray:
        """codes (B, g, g) (or (B, g*g)) -> uint8 images (B, H, W, 3) in the world's colours."""
        codes = torch.as_tensor(codes, device=self.codebook.device).long()
        g, n, p = self.cfg.grid, self.cfg.codebook_size, self.cfg.patch
        if codes.dim() == 2 and codes.shape[1] == g * g:
            codes = codes.reshape(codes.shape[0], g, g)
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (g, g):
            raise ValueError(f"VQ decode: codes of shape {tuple(codes.shape)}, expected (B, {g}, {g}) or (B, {g * g})")
        if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < n):
            raise ValueError(f"VQ decode: codes outside [0, {n})")
        colour, m = codes // self.cfg.mask_codes, codes % self.cfg.mask_codes
        fg = self.mask_logits(self.embed_codes(m)) > 0  # (B, H, W)
        cls = torch.where(fg, colour.repeat_interleave(p, 1).repeat_interleave(p, 2), 0)
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


@dataclass
class VQTrainConfig:
    steps: int = 1500              # optimizer steps
    batch: int = 64                # images per step
    lr: float = 2e-3               # AdamW peak learning rate (warm-up then cosine)
    restart_every: int = 50        # steps between restarts of mask codes unused since the last restart (0: never)
    seed: int = 0                  # init, batch order and restarts
    progress: bool = True


def train_vq(images: np.ndarray, cfg: VQTrainConfig, vq_cfg: VQConfig = VQConfig(), device="cpu") -> tuple:
    """Train a `VQTokenizer` on uint8 renders (N, H, W, 3); returns (model in eval mode, losses)."""
    from tqdm import tqdm

    from ..optim import OptimConfig, lr_at, make_optimizer

    torch.manual_seed(cfg.seed)
    model = VQTokenizer(vq_cfg).to(device)
    fg = torch.cat([model.classes_in(images[s:s + 512]) > 0 for s in range(0, len(images), 512)]).float()  # (N, H, W)
    oc = OptimConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=max(1, cfg.steps // 20), weight_decay=0.0)
    opt = make_optimizer(model, oc)
    gen = torch.Generator().manual_seed(cfg.seed)
    used = torch.zeros(vq_cfg.mask_codes, dtype=torch.bool, device=device)
    losses = []
    model.train()
    for step in tqdm(range(cfg.steps), disable=not cfg.progress, desc="vq", dynamic_ncols=True):
        idx = torch.randint(len(fg), (cfg.batch,), generator=gen)
        x = fg[idx].to(device)  # (b, H, W)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, oc)
        logits, vq, codes = model(x[:, None])
        loss = F.binary_cross_entropy_with_logits(logits, x) + vq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        used[codes.flatten()] = True
        if cfg.restart_every and (step + 1) % cfg.restart_every == 0 and step + 1 < cfg.steps * 0.8:
            dead = (~used).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    z = model.latents(x[:, None]).reshape(-1, vq_cfg.code_dim)
                    pick = torch.randint(len(z), (len(dead),), generator=gen).to(device)
                    model.codebook[dead] = z[pick] + 0.01 * torch.randn(len(dead), vq_cfg.code_dim, generator=gen).to(device)
            used.zero_()
    return model.eval(), losses
