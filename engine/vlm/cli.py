"""CLI for vision-language models: `mmfuse chat` (one question, or an interactive chat about an image)."""
from __future__ import annotations

import sys

from ..cli_options import add_model_options, prepare_model_args
from ..decoder.cli import sampling_options


def register(sub) -> None:
    c = sub.add_parser("chat", help="ask a vision-language model about an image (interactive without --prompt)")
    add_model_options(c)
    c.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    c.add_argument("--prompt", help="the question; without it, an interactive multi-turn chat on stdin")
    c.add_argument("--stream", action="store_true", help="print text as it is generated")
    for name, kw in SAMPLING_FLAGS:
        c.add_argument(name, **kw)
    c.set_defaults(func=cmd_chat)


SAMPLING_FLAGS = [
    ("--max-new-tokens", dict(type=int)), ("--min-new-tokens", dict(type=int)),
    ("--temperature", dict(type=float, help="0 = greedy")), ("--top-k", dict(type=int)),
    ("--top-p", dict(type=float)), ("--min-p", dict(type=float)), ("--repetition-penalty", dict(type=float)),
    ("--presence-penalty", dict(type=float)), ("--frequency-penalty", dict(type=float)),
    ("--stop", dict(action="append", default=None, help="stop string (repeatable)")),
    ("--stop-id", dict(type=int, action="append", default=None, help="stop token id (repeatable)")),
    ("--seed", dict(type=int)),
]


def _turn(vlm, messages: list, images: list, stream: bool, opts: dict) -> str:
    if not stream:
        text = vlm.generate(messages, images=images, **opts)[0].text
        print(text)
        return text
    parts = []
    for chunk in vlm.stream(messages, images=images, **opts):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        parts.append(chunk.text)
    sys.stdout.write("\n")
    return "".join(parts)


def cmd_chat(args) -> int:
    from .engine import VisionLanguageModel

    prepare_model_args(args)
    vlm = VisionLanguageModel.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    opts = sampling_options(args)
    images = list(args.image)
    first = [{"type": "image"} for _ in images]
    if args.prompt is not None:
        _turn(vlm, [{"role": "user", "content": first + [{"type": "text", "text": args.prompt}]}], images,
              args.stream, opts)
        return 0
    messages = []
    for line in sys.stdin:  # one question per line; the conversation so far stays in the cache
        q = line.rstrip("\n")
        if not q.strip():
            continue
        messages.append({"role": "user", "content": (first if not messages else []) + [{"type": "text", "text": q}]})
        answer = _turn(vlm, messages, images, args.stream, opts)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return 0
