"""`mmfuse demo`: the shipped models doing their jobs on held-out scenes, with quality metrics
(world.metrics) and latencies, a table or JSON, and an HTML report with the images.

Held-out scenes are the seeds HELD_OUT + i (training used seeds below the training set size,
which is far below HELD_OUT). Greedy decoding everywhere, so the report is reproducible.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..decoder.speculative import NGramLMDrafter, speculative_generate
from .language import CAPTION_PROMPT, QUESTION_TYPES, caption, questions
from .metrics import accuracy, caption_metrics, parse_matches, recall_at_1, vqa_accuracy
from .parse import parse_image
from .scene import COLOURS, POSITIONS, SHAPES, SIZES, generate_scene, render
from .load import load
from .shipped import SHIPPED
from .train import HELD_OUT

TARGETS = {"vqa": 0.95, "caption_attribute_precision": 0.95, "caption_object_recall": 0.90, "retrieval_r1": 0.90,
           "zero_shot_colour": 0.95, "zero_shot_shape": 0.95, "text_to_image_parse_match": 0.80}


@dataclass
class DemoConfig:
    scenes: int = 100              # held-out scenes captioned and questioned
    retrieval_scenes: int = 1000   # held-out scenes for retrieval and zero-shot classification
    speculative: int = 20          # captions decoded speculatively (and plainly, to compare)
    batch: int = 16                # VLM requests per generate call (and captions per imagine call)
    imagine: int = 200             # held-out captions turned into images (0: skip text-to-image)
    first_seed: int = HELD_OUT
    progress: bool = True


def load_models(root=None) -> dict:
    """The shipped models, or those of a `mmfuse world train --out` folder `root` (a model whose
    folder `root` lacks, as after `world train --only ...`, is the shipped one)."""
    def where(name):
        return root if root is not None and (Path(root) / SHIPPED[name][0]).is_dir() else None

    return {key: load(f"world-{key}", where(f"world-{key}")) for key in ("clip", "vlm", "ngram", "imagine")}


def chat(question: str) -> list:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def ask_all(vlm, items, cfg: DemoConfig, desc: str, max_new_tokens: int) -> tuple:
    """Greedy answers to (image, question) items in batches; returns (texts, seconds per item)."""
    out = []
    t = time.perf_counter()
    bar = tqdm(total=len(items), desc=desc, disable=not cfg.progress, leave=False)
    for s in range(0, len(items), cfg.batch):
        chunk = items[s:s + cfg.batch]
        comps = vlm.generate([chat(q) for _, q in chunk], images=[[im] for im, _ in chunk], temperature=0.0,
                             max_new_tokens=max_new_tokens)
        out += [c.text.strip() for c in comps]
        bar.update(len(chunk))
    bar.close()
    return out, (time.perf_counter() - t) / max(1, len(items))


def zero_shot(clip, images, scenes) -> dict:
    """Colour and shape of single-object scenes, classified with prompts over the other attributes: a
    class scores its best-matching prompt (averaging the prompts' embeddings, CLIP's usual ensemble,
    blurs a model whose embeddings bind attributes to each other rather than add them)."""
    single = [(im, sc.objects[0]) for im, sc in zip(images, scenes) if len(sc.objects) == 1]
    if not single:
        return {"zero_shot_colour": float("nan"), "zero_shot_shape": float("nan"), "zero_shot_n": 0}
    img = clip.encode_image([im for im, _ in single])
    out = {"zero_shot_n": len(single)}
    for attr, classes in (("colour", COLOURS), ("shape", SHAPES)):
        if attr == "colour":
            templates = [lambda c, z=z, s=s, p=p: f"a {z} {c} {s} at the {p}" for z in SIZES for s in SHAPES for p in POSITIONS]
        else:
            templates = [lambda c, z=z, k=k, p=p: f"a {z} {k} {c} at the {p}" for z in SIZES for k in COLOURS for p in POSITIONS]
        txt = clip.encode_text([t(c) for c in classes for t in templates])  # (C * T, E)
        pred = (img @ txt.T).view(len(img), len(classes), len(templates)).amax(-1).argmax(-1).tolist()
        out[f"zero_shot_{attr}"] = accuracy([classes[i] for i in pred], [getattr(o, attr) for _, o in single])
    return out


def retrieval(clip, images, scenes) -> dict:
    """Image-to-text R@1 among the distinct captions of the scenes."""
    caps = [caption(s) for s in scenes]
    distinct = sorted(set(caps))
    t = time.perf_counter()
    img = clip.encode_image(images)
    t_img = (time.perf_counter() - t) / len(images)
    txt = clip.encode_text(distinct)
    sim = (img @ txt.T).numpy()
    targets = [distinct.index(c) for c in caps]
    return {"retrieval_r1": recall_at_1(sim, targets), "retrieval_captions": len(distinct),
            "retrieval_images": len(images), "image_embed_ms": 1000 * t_img}


def speculative(vlm, lm, items, cfg: DemoConfig) -> dict:
    """Greedy captions decoded plainly and with the n-gram drafter: identical tokens? speed-up?"""
    drafter = NGramLMDrafter(lm)
    if items:  # one untimed run of each path first: first calls pay one-off costs (step plans, JIT, packing)
        p = vlm.prepare(chat(items[0][1]), [items[0][0]])
        vlm.generate(p, temperature=0.0, max_new_tokens=48)
        speculative_generate(vlm, p, drafter, k=6, temperature=0.0, max_new_tokens=48)
    same, t_plain, t_spec, drafted, accepted = 0, 0.0, 0.0, 0, 0
    for im, q in tqdm(items, desc="speculative", disable=not cfg.progress, leave=False):
        p = vlm.prepare(chat(q), [im])
        t = time.perf_counter()
        plain = vlm.generate(p, temperature=0.0, max_new_tokens=48)[0]
        t_plain += time.perf_counter() - t
        t = time.perf_counter()
        spec, stats = speculative_generate(vlm, p, drafter, k=6, temperature=0.0, max_new_tokens=48)
        t_spec += time.perf_counter() - t
        same += spec.token_ids == plain.token_ids
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    n = max(1, len(items))
    return {"speculative_identical": same / n, "speculative_speedup": t_plain / t_spec if t_spec else float("nan"),
            "speculative_acceptance": accepted / drafted if drafted else 0.0, "speculative_n": len(items),
            "plain_caption_ms": 1000 * t_plain / n, "speculative_caption_ms": 1000 * t_spec / n}


def text_to_image(model, captions: list, cfg: DemoConfig, truth=None) -> tuple:
    """Images of held-out captions (the model's sampling defaults, seeds 0, 1, ...): the fraction
    whose parsed objects equal the caption's, and seconds per image; with `truth` (the renders of
    the captions' scenes) also the fraction of VQ reconstructions that parse as their scene.
    Returns (metrics, [(caption, image, match)])."""
    images = []
    t = time.perf_counter()
    for s in tqdm(range(0, len(captions), cfg.batch), desc="imagine", disable=not cfg.progress, leave=False):
        images += list(model.imagine(captions[s:s + cfg.batch], seed=s))
    per = (time.perf_counter() - t) / len(captions)
    t = time.perf_counter()
    model.imagine(captions[0], seed=0)
    single = time.perf_counter() - t
    match = parse_matches(images, captions)
    m = {"text_to_image_parse_match": float(np.mean(match)), "text_to_image_n": len(captions),
         "imagine_ms": 1000 * single, "imagine_batched_ms": 1000 * per}
    if truth is not None:
        rec = model.vq.decode(model.vq.encode(np.stack(truth)))
        m["vq_reconstruction_parse_match"] = float(np.mean([parse_image(r) == parse_image(t) for r, t in zip(rec, truth)]))
    return m, list(zip(captions, images, match))


def run_demo(cfg: DemoConfig = DemoConfig(), models=None, root=None) -> tuple:
    """(metrics dict, per-scene records for the report)."""
    torch.manual_seed(0)
    models = models or load_models(root)
    vlm, clip = models["vlm"], models["clip"]
    seeds = [cfg.first_seed + i for i in range(max(cfg.scenes, cfg.retrieval_scenes, cfg.imagine))]
    scenes = [generate_scene(s) for s in seeds]
    images = [render(s) for s in scenes]
    n = cfg.scenes
    caps, t_cap = ask_all(vlm, [(images[i], CAPTION_PROMPT) for i in range(n)], cfg, "caption", 48)
    qas = [(i, qa) for i in range(n) for qa in questions(scenes[i], seeds[i])]
    answers, t_qa = ask_all(vlm, [(images[i], qa.question) for i, qa in qas], cfg, "vqa", 4)
    vqa = vqa_accuracy([(qa.kind, a, qa.answer) for (_, qa), a in zip(qas, answers)])
    cm = caption_metrics(list(zip(caps, scenes[:n])))
    m = {"vqa": vqa["overall"], **{f"vqa_{k}": vqa["by_type"].get(k, float("nan")) for k in QUESTION_TYPES},
         "vqa_n": vqa["n"], "caption_attribute_precision": cm["attribute_precision"],
         "caption_object_recall": cm["object_recall"], "caption_exact": accuracy(caps, [caption(s) for s in scenes[:n]]),
         "caption_n": n, "caption_ms": 1000 * t_cap, "vqa_ms": 1000 * t_qa}
    r = cfg.retrieval_scenes
    m.update(retrieval(clip, images[:r], scenes[:r]))
    m.update(zero_shot(clip, images[:r], scenes[:r]))
    m.update(speculative(vlm, models["ngram"], [(images[i], CAPTION_PROMPT) for i in range(min(cfg.speculative, n))], cfg))
    generated = []
    if cfg.imagine:
        k = cfg.imagine
        t2i, generated = text_to_image(models["imagine"], [caption(s) for s in scenes[:k]], cfg, images[:k])
        m.update(t2i)
    records = [{"seed": seeds[i], "image": images[i], "caption": caps[i], "truth": caption(scenes[i]),
                "qa": [(qa.kind, qa.question, a, qa.answer) for (j, qa), a in zip(qas, answers) if j == i]}
               for i in range(n)]
    for r, (_, img, match) in zip(records, generated):
        r["generated"], r["generated_match"] = img, match
    return m, records


def table(m: dict) -> str:
    rows = [("metric", "value", "target")]
    for k, v in m.items():
        if isinstance(v, float):
            val = f"{v:.3f}" if not k.endswith("_ms") else f"{v:.1f}"
        else:
            val = "not built" if v is None else str(v)
        rows.append((k, val, f">= {TARGETS[k]:.2f}" if k in TARGETS else ""))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows)


def write_report(folder, m: dict, records: list) -> Path:
    """folder/report.html with each scene's image, generated caption, truth and answers."""
    from PIL import Image

    from ..files import atomic_open

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    parts = ["<!doctype html><meta charset='utf-8'><title>mmfuse demo</title>",
             "<style>body{font-family:sans-serif}td{padding:4px;vertical-align:top}img{image-rendering:pixelated}"
             ".bad{color:#b00}</style><h1>mmfuse demo: shipped world models on held-out scenes</h1>",
             "<h2>Metrics</h2><pre>" + html.escape(table(m)) + "</pre><h2>Scenes</h2><table>"]
    for r in records:
        name = f"images/scene-{r['seed']}.png"
        Image.fromarray(r["image"]).resize((128, 128), Image.NEAREST).save(folder / name)
        qa = "".join(f"<li{'' if a == t else ' class=bad'}>[{k}] {html.escape(q)}? <b>{html.escape(a)}</b>"
                     f"{'' if a == t else ' (true: ' + html.escape(t) + ')'}</li>" for k, q, a, t in r["qa"])
        gen = ""
        if "generated" in r:
            Image.fromarray(r["generated"]).resize((128, 128), Image.NEAREST).save(folder / f"images/imagined-{r['seed']}.png")
            gen = (f"<td><img src='images/imagined-{r['seed']}.png' width=128><br><small"
                   f"{'' if r['generated_match'] else ' class=bad'}>imagined from the true caption: "
                   f"{'parses as the caption' if r['generated_match'] else 'does not parse as the caption'}</small></td>")
        cls = "" if r["caption"] == r["truth"] else " class=bad"
        parts.append(f"<tr><td><img src='{name}' width=128></td><td>seed {r['seed']}<br><span{cls}>"
                     f"{html.escape(r['caption'])}</span><br><small>truth: {html.escape(r['truth'])}</small>"
                     f"<ul>{qa}</ul></td>{gen}</tr>")
    parts.append("</table>")
    with atomic_open(folder / "report.html", "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return folder / "report.html"


def metrics_json(m: dict) -> dict:
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in m.items()}
