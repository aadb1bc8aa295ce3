"""`mmfuse embed`: embed images or texts with a CLIP / SigLIP / BERT checkpoint into a .npy file.

    mmfuse embed CKPT --images a.jpg b.png --out img.npy
    mmfuse embed CKPT --texts captions.txt --out txt.npy     (one text per non-empty line)
    mmfuse embed CKPT --text "a photo of a cat" --text "a dog" --out q.npy
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..errors import PromptError
from ..files import atomic_open


def _embed(args) -> int:
    from .api import load_encoder

    if bool(args.images) + bool(args.texts or args.text) != 1:
        raise ValueError("give either --images or --texts/--text")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    target = args.out if args.out.endswith(".npy") else args.out + ".npy"  # as np.save names it
    # The temporary file beside --out is made first: an unwritable place fails before any model work,
    # and a failure later leaves the previous file untouched.
    with atomic_open(target, "wb") as f:
        enc = load_encoder(args.checkpoint, dtype=args.dtype)
        if args.images:
            emb = enc.encode_image(args.images, batch_size=args.batch_size, normalize=not args.no_normalize)
        else:
            texts = list(args.text or [])
            if args.texts:
                path = Path(args.texts)
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: text file not found")
                try:
                    texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                except UnicodeDecodeError as e:
                    raise PromptError(f"{path}: not UTF-8 text (byte {e.start})") from None
            emb = enc.encode_text(texts, batch_size=args.batch_size, normalize=not args.no_normalize)
        out = np.ascontiguousarray(emb.numpy().astype(np.float32))
        np.save(f, out)
    print(f"wrote {out.shape[0]} x {out.shape[1]} embeddings to {target}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="embed images or texts with a CLIP/SigLIP/BERT checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="Hugging Face checkpoint folder (CLIPModel, SiglipModel or BertModel)")
    p.add_argument("--images", nargs="+", help="image files")
    p.add_argument("--texts", help="text file, one text per non-empty line")
    p.add_argument("--text", action="append", help="a text (repeatable)")
    p.add_argument("--out", required=True, help="output .npy file (float32, one row per input)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-normalize", action="store_true", help="raw projected features instead of unit vectors")
    p.set_defaults(func=_embed)
