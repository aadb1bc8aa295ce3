"""`mmfuse world train` (train the shipped models), `mmfuse demo` (run them on held-out scenes),
`mmfuse imagine` (an image from a caption)."""
from __future__ import annotations

import sys
from pathlib import Path

STAGES = ("clip", "vlm", "ngram", "imagine")  # world.train.STAGES (kept here so --help does not import torch)


def register(sub) -> None:
    w = sub.add_parser("world", help="the procedurally generated world and the models mmfuse ships")
    ws = w.add_subparsers(dest="world_command", required=True)
    t = ws.add_parser("train", help="train every shipped model (fixed seeds) into --out")
    t.add_argument("--out", required=True, help="output folder (clip/, vlm/, ngram/, training.json, MODEL_CARD.md)")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    t.add_argument("--scenes", type=int, default=None, help="training scenes (default: the shipped run's)")
    t.add_argument("--seed", type=int, default=None, help="model init and batch order seed (default: the shipped run's)")
    t.add_argument("--clip-steps", type=int, default=None)
    t.add_argument("--vlm-steps", type=int, default=None)
    t.add_argument("--imagine-steps", type=int, default=None, help="text-to-image decoder steps")
    t.add_argument("--vq-steps", type=int, default=None, help="VQ image tokenizer steps")
    t.add_argument("--only", nargs="+", choices=STAGES, default=STAGES, metavar="STAGE",
                   help=f"train only these models ({', '.join(STAGES)}; vlm needs clip); `world install` "
                        "keeps the shipped ones of the others")
    t.add_argument("--eval-scenes", type=int, default=200, help="held-out scenes measured for the model card")
    t.add_argument("--eval-imagine", type=int, default=200, help="held-out captions turned into images for the card")
    t.add_argument("--install", action="store_true", help="copy the trained models into mmfuse's shipped folder")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)
    i = ws.add_parser("install", help="measure a trained folder on held-out scenes and copy it into the shipped "
                                      "models with a model card")
    i.add_argument("trained", help="a `mmfuse world train --out` folder")
    i.add_argument("--eval-scenes", type=int, default=200, help="held-out scenes measured for the model card")
    i.add_argument("--eval-imagine", type=int, default=200, help="held-out captions turned into images for the card")
    i.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    i.set_defaults(func=cmd_install)
    d = sub.add_parser("demo", help="the shipped models on held-out scenes: captions, VQA, retrieval, zero-shot, "
                                    "speculative decoding; metrics and latencies")
    d.add_argument("--scenes", type=int, default=50, help="held-out scenes captioned and questioned")
    d.add_argument("--retrieval-scenes", type=int, default=1000, help="held-out scenes for retrieval and zero-shot")
    d.add_argument("--speculative", type=int, default=5, help="captions decoded speculatively and plainly")
    d.add_argument("--models", help="a `mmfuse world train --out` folder instead of the shipped models")
    d.add_argument("--out", help="write DIR/report.html with the images, captions and answers")
    d.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    d.add_argument("--imagine", type=int, default=200, help="held-out captions turned into images (200: the count its "
                                                             "0.80 target was set on; 20 moves it by 0.05 a caption)")
    d.set_defaults(func=cmd_demo)
    g = sub.add_parser("imagine", help="an image of the world from a caption (text-to-image model, sampled "
                                       "with the engine, optional classifier-free guidance)")
    g.add_argument("--prompt", required=True, help='a caption in the world\'s words: "a large red circle at the top left"')
    g.add_argument("--out", required=True, help="PNG file to write")
    g.add_argument("--model", default="world-imagine", help="a shipped name or a model folder")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1: none); "
                   "default: the model's")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=None, help="default: the model's")
    g.add_argument("--top-k", type=int, default=None, help="default: the model's")
    g.add_argument("--top-p", type=float, default=None, help="default: the model's")
    g.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the 64 x 64 image")
    g.set_defaults(func=cmd_imagine)


def cmd_train(args) -> int:
    from ..device import check_device
    from .train import WorldTrainConfig, train_world

    check_device(args.device, "--device")
    cfg = WorldTrainConfig(device=args.device, progress=not args.quiet)
    for name, field in (("scenes", "train_scenes"), ("seed", "seed"), ("clip_steps", "clip_steps"), ("vlm_steps", "vlm_steps")):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, field, v)
    if args.imagine_steps is not None:
        cfg.imagine.steps = args.imagine_steps
    if args.vq_steps is not None:
        cfg.imagine.vq.steps = args.vq_steps
    argv = "mmfuse " + " ".join(sys.argv[1:]) if sys.argv and Path(sys.argv[0]).name == "mmfuse" else None
    times = train_world(Path(args.out), cfg, command=argv, stages=tuple(args.only))
    print(" ".join(f"{k}={v:.0f}s" for k, v in times.items()))
    if args.install:
        args.trained = args.out
        return cmd_install(args)
    return 0


def cmd_install(args) -> int:
    from .card import install
    from .demo import DemoConfig, run_demo

    demo = DemoConfig(scenes=args.eval_scenes, imagine=args.eval_imagine, progress=not args.quiet)
    m, _ = run_demo(demo, root=args.trained)
    card = install(Path(args.trained), m, f"mmfuse demo --scenes {args.eval_scenes} --imagine {args.eval_imagine} --json")
    print(f"installed; model card: {card}")
    return 0


def cmd_demo(args) -> int:
    from ..cli_options import emit_json
    from .demo import DemoConfig, metrics_json, run_demo, table, write_report

    for name in ("scenes", "retrieval_scenes", "speculative"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    cfg = DemoConfig(scenes=args.scenes, retrieval_scenes=args.retrieval_scenes, speculative=args.speculative,
                     imagine=args.imagine, progress=not args.quiet and sys.stderr.isatty())
    m, records = run_demo(cfg, root=args.models)
    if args.out:
        report = write_report(args.out, m, records)
        print(f"report: {report}", file=sys.stderr)
    if args.json:
        emit_json(metrics_json(m))
    else:
        print(table(m))
    return 0


def cmd_imagine(args) -> int:
    from PIL import Image

    from ..files import atomic_path
    from .imagine import Imaginer
    from .shipped import resolve_model

    if args.scale < 1:
        raise ValueError(f"--scale must be at least 1, got {args.scale}")
    model = Imaginer.from_pretrained(resolve_model(args.model))
    img = model.imagine(args.prompt, guidance=args.guidance, seed=args.seed, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p)
    side = img.shape[0] * args.scale
    with atomic_path(args.out) as tmp:
        Image.fromarray(img).resize((side, side), Image.NEAREST).save(tmp, format="PNG")
    print(args.out)
    return 0
