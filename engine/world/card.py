"""Install trained world models into mmfuse's shipped folder with a model card (command, seeds,
data sizes, measured metrics, sha256 checksums of every file)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..files import atomic_open, write_json
from .demo import table
from .shipped import ROOT, SHIPPED


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def clip_recipe(cfg: dict) -> str:
    parts = ["half of each batch one-attribute or one-position variants of the other half"] if cfg.get("clip_siblings") else []
    if cfg.get("clip_aux"):
        parts.append(f"plus {cfg['clip_aux']} x a patch-attribute cross-entropy of a linear probe on the last "
                     "hidden states, the probe dropped after training")
    if cfg.get("clip_scene_probe"):
        parts.append(f"plus {cfg['clip_scene_probe']} x the cross-entropy of a linear probe reading every cell's "
                     "attributes from each embedding, dropped after training")
    if cfg.get("clip_pos_std"):
        parts.append(f"vision position embeddings initialised with std {cfg['clip_pos_std']}")
    return "".join("; " + p for p in parts)


def extra_questions(cfg: dict) -> str:
    if cfg.get("vlm_extra_relations"):  # the config of runs before vlm_extra_draws
        return f", plus {cfg['vlm_extra_relations']} more relation questions"
    if cfg.get("vlm_extra_draws") and cfg.get("vlm_extra_kinds"):
        return f", plus the {' and '.join(cfg['vlm_extra_kinds'])} questions of {cfg['vlm_extra_draws']} more draws"
    return ""


def model_card(folder: Path, training: dict, metrics: dict, demo_command: str) -> str:
    cfg = training["config"]
    files = sorted(p for sub, _ in SHIPPED.values() for p in (folder / sub).rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    runs = producers(training)
    loads = training.get("load_averages", {training["command"]: training.get("load_average")})
    lines = [
        "# mmfuse shipped world models", "",
        "Small models trained by mmfuse's own code on its procedurally generated world (`mmfuse.world`):",
        "64 x 64 images with 1-4 coloured shapes on a 2 x 2 grid, captions and questions from a grammar.",
        "", "| name | folder | what |", "|---|---|---|",
        "| world-clip | clip/ | CLIP dual encoder (contrastive loss of mmfuse.kernels): retrieval, zero-shot |",
        "| world-vlm | vlm/ | LLaVA: world-clip's vision tower, MLP projector, Llama decoder: captions, VQA |",
        "| world-ngram | ngram/ | token n-gram model of the VLM's answers (C++ SLM): speculative drafter |",
        "| world-imagine | imagine/ | text-to-image: VQ image tokenizer + Llama decoder over its codes, CFG |",
        "", "## Reproduce", "",
        *(f"    {c}" + (f"   # {', '.join(stages)}" if len(runs) > 1 else "") for c, stages in runs.items()),
        *([] if "--install" in training["command"] else ["    mmfuse world install DIR   # DIR: the --out folder above"]), "",
        f"Seeds: model init and batch order seed {cfg['seed']}; training scenes are the seeds "
        f"0..{cfg['train_scenes'] - 1}; held-out scenes start at seed {training['held_out_from_seed']}. "
        f"torch threads: {cfg['threads']}; device {cfg['device']}; torch {training['torch']}.", "",
        f"Data: {cfg['train_scenes']} scenes; CLIP {cfg['clip_steps']} steps x batch {cfg['clip_batch']} "
        f"(lr {cfg['clip_lr']}{clip_recipe(cfg)}); VLM {cfg['vlm_steps']} steps x batch {cfg['vlm_batch']} "
        f"conversations (lr {cfg['vlm_lr']}, each a caption and one question of each type, drawn anew each epoch"
        f"{extra_questions(cfg)}"
        f", turns shuffled; vision "
        f"tower {'fine-tuned' if cfg.get('vlm_train_tower', True) else 'frozen'}); n-gram order "
        f"{cfg['ngram_order']} over the answers of every training scene.", "",
        "Training time (seconds, a shared 2-core CPU): "
        + ", ".join(f"{k} {v:.0f}" for k, v in training["seconds"].items())
        + f"; total {sum(training['seconds'].values()):.0f}"
        + (f"; wall clock {training['wall_seconds']:.0f} ({', '.join(training['parallel'])} in a second process "
           "beside the others)" if training.get("parallel") and training.get("wall_seconds") else "")
        + "".join(f"; load average {loads[c]}" + (f" ({', '.join(stages)})" if len(runs) > 1 else "")
                  for c, stages in runs.items() if loads.get(c)) + ".", "",
        "Sizes: " + json.dumps(cfg["sizes"]), "",
        f"## Metrics (held-out scenes, `{demo_command}`)", "", "```", table(metrics), "```", "",
        *imagine_lines(cfg.get("imagine")), "",
        f"## Files ({total / 1e6:.2f} MB)", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {p.relative_to(folder)} | {p.stat().st_size} | {sha256(p)} |" for p in files]
    return "\n".join(lines) + "\n"


def imagine_lines(c) -> list:
    if not c:
        return ["Text-to-image is not part of this release."]
    v, vs = c["vq"], c["vq_sizes"]
    return ["Text-to-image: VQ tokenizer (patch {p}: {g}x{g} codes, {k} colours x {m} shape codes of dim {d}, width {w}) trained {vsteps} "
            "steps x batch {vb}; decoder {l} layers x {dm} wide, {steps} steps x batch {b} (lr {lr}, caption dropout "
            "{cd}); sampled with guidance {gs}, temperature {t}, top-k {tk}.".format(
                p=vs["patch"], g=vs["image_size"] // vs["patch"], k=len(vs["colours"]), m=vs["mask_codes"], d=vs["code_dim"],
                w=vs["width"], vsteps=v["steps"], vb=v["batch"], l=c["layers"], dm=c["width"], steps=c["steps"],
                b=c["batch"], lr=c["lr"], cd=c["caption_dropout"], gs=c["guidance"], t=c["temperature"], tk=c["top_k"])]


def producers(training: dict) -> dict:
    """{command: [stages]}: which run made each shipped model (the first run, or a later `--only` run)."""
    made = {stage: training["command"] for stage in training["seconds"]}
    made.update(training.get("stage_commands", {}))
    out = {}
    for stage, command in made.items():
        out.setdefault(command, []).append(stage)
    return out


def merge_training(old: dict, new: dict) -> dict:
    """training.json of a partial run (`world train --only`) merged into the shipped one: its
    stages' seconds and config, its command beside the original and its load average beside theirs."""
    out = json.loads(json.dumps(old))
    out.pop("wall_seconds", None)  # stages of several runs: no one wall clock
    out.pop("parallel", None)
    stages = list(new["seconds"])
    out["seconds"].update(new["seconds"])
    if set(stages) - {"imagine"}:  # the new run's settings of clip / vlm / ngram, the old imagine unless retrained
        imagine = out["config"].get("imagine")
        out["config"] = json.loads(json.dumps(new["config"]))
        if "imagine" not in stages:
            out["config"]["imagine"] = imagine
    else:
        out["config"]["imagine"] = new["config"]["imagine"]
    out.setdefault("stage_commands", {}).update({s: new["command"] for s in stages})
    loads = out.setdefault("load_averages", {out["command"]: out.get("load_average")})
    loads[new["command"]] = new.get("load_average")
    return out


def install(trained: Path, metrics: dict, demo_command: str, root: Path = ROOT) -> Path:
    """Copy the trained models into `root` and write root/MODEL_CARD.md; returns the card's path."""
    trained, root = Path(trained), Path(root)
    training = json.loads((trained / "training.json").read_text())
    subs = [sub for sub, _ in SHIPPED.values()]
    partial = not all((trained / sub).is_dir() for sub in subs)
    if partial:  # `world train --only`: keep the shipped models of the other stages
        training = merge_training(json.loads((root / "training.json").read_text()), training)
    for sub in subs:
        if not (trained / sub).is_dir():
            continue
        if (root / sub).exists():
            shutil.rmtree(root / sub)
        shutil.copytree(trained / sub, root / sub)
    write_json(root / "training.json", training)
    with atomic_open(root / "MODEL_CARD.md", "w", encoding="utf-8") as f:
        f.write(model_card(root, training, metrics, demo_command))
    return root / "MODEL_CARD.md"
