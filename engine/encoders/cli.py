"""`mmfuse embed`: embed images or texts with a CLIP / SigLIP / BERT checkpoint into a .npy file.

    mmfuse embed --model CKPT --images a.jpg b.png --out img.npy
    mmfuse embed --model CKPT --texts captions.txt --out txt.npy     (one text per non-empty line)
    mmfuse embed --model CKPT --text "a photo of a cat" --text "a dog" --json   (JSON lines on stdout)
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from ..cli_options import add_model_options, add_output_options, check_output, emit_json, prepare_model_args, progress
from ..errors import PromptError


def _embed(args) -> int:
    import numpy as np

    from ..files import atomic_path
    from .api import load_encoder

    if args.checkpoint is not None:
        if args.model is not None:
            raise ValueError("give the checkpoint once: --model DIR (the positional form is deprecated)")
        warnings.warn("mmfuse embed CKPT is deprecated: use mmfuse embed --model CKPT", DeprecationWarning)
        args.model = args.checkpoint
    if args.model is None:
        raise ValueError("--model: a checkpoint folder is required")
    if bool(args.images) + bool(args.texts or args.text) != 1:
        raise ValueError("give either --images or --texts/--text")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.out is None and not args.json:
        raise ValueError("give --out FILE.npy and/or --json")
    out_path = check_output(args.out, "--out", ".npy") if args.out is not None else None
    texts = list(args.text or [])
    if args.texts:
        path = Path(args.texts)
        if not path.is_file():
            raise FileNotFoundError(f"--texts {path}: text file not found")
        try:
            texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise PromptError(f"--texts {path}: not UTF-8 text (byte {e.start})") from None
    prepare_model_args(args)
    enc = load_encoder(args.model, dtype=args.dtype, device=args.device)
    inputs = args.images or texts
    parts = []
    bar = progress(total=len(inputs), desc="embed", quiet=args.quiet, unit="input")
    for s in range(0, len(inputs), args.batch_size):
        chunk = inputs[s:s + args.batch_size]
        if args.images:
            parts.append(enc.encode_image(chunk, batch_size=args.batch_size, normalize=not args.no_normalize))
        else:
            parts.append(enc.encode_text(chunk, batch_size=args.batch_size, normalize=not args.no_normalize))
        bar.update(len(chunk))
    bar.close()
    import torch

    out = np.ascontiguousarray(torch.cat(parts).numpy().astype(np.float32))
    if out_path is not None:
        with atomic_path(out_path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, out)
        if not args.quiet and not args.json:
            print(f"wrote {out.shape[0]} x {out.shape[1]} embeddings to {out_path}", file=sys.stderr)
    if args.json:
        for i, (item, row) in enumerate(zip(inputs, out.tolist())):
            emit_json({"index": i, "input": str(item), "embedding": row})
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="embed images or texts with a CLIP/SigLIP/BERT checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", help="deprecated: use --model")
    add_model_options(p, required=False)
    p.add_argument("--images", nargs="+", help="image files")
    p.add_argument("--texts", help="text file, one text per non-empty line")
    p.add_argument("--text", action="append", help="a text (repeatable)")
    p.add_argument("--out", help="output .npy file (float32, one row per input; .npy is appended if missing)")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass")
    p.add_argument("--no-normalize", action="store_true", help="raw projected features instead of unit vectors")
    add_output_options(p)
    p.set_defaults(func=_embed)
