"""Train the world's models with mmfuse's own loops (`mmfuse world train --out DIR`).

1. CLIP: the contrastive loss of `encoders.train` (the fused loss of mmfuse.kernels) on rendered
   scenes and their captions, each batch half scenes and half their siblings (one attribute or
   position changed: hard negatives), plus linear probes' cross-entropies (dropped after training):
   on the tower's last hidden states against each patch's cell attributes (the features the VLM
   reads), and on both embeddings against every cell's attributes. The vision position embeddings
   start large (std 1): at the usual small init the tower never learned where a lone object is.
   bench/README.md has the measured effects.
2. VLM (LLaVA format): the CLIP vision tower, a projector and a small Llama decoder, trained with
   the decoder loop (`decoder.train`) on multi-turn conversations about each scene (caption and
   every question type, drawn anew each epoch, plus more of the search questions (relation,
   position) from further draws; turns shuffled so that each comes first as often), loss on
   answers only; the vision tower stays world-clip's (frozen).
3. n-gram: the C++ SLM over the VLM's token ids of the answers, the speculative drafter.
4. Text-to-image: a VQ tokenizer and a Llama decoder over image tokens (`world.imagine_train`).

Training scenes are the seeds [0, train_scenes); held-out seeds start at HELD_OUT (never trained
on). Seeds, thread count and sizes are fixed by `WorldTrainConfig`, so the command reproduces its
weights on the same software stack.
"""
from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..decoder.train import IGNORE, DecoderTrainConfig, llama_decoder_config, next_token_loss, train_decoder
from ..encoders.clip import ClipModel
from ..encoders.preprocess import ImageProcessor
from ..files import write_json
from ..encoders.tokens import TextTokenizer
from ..encoders.train import TrainConfig, contrastive_loss
from ..nn.layers import init_weights
from ..optim import lr_at, make_optimizer
from ..vlm.config import VlmConfig
from ..vlm.llava import LlavaModel
from .imagine_train import ImagineTrainConfig, train_imagine
from .language import CAPTION_PROMPT, caption, questions
from .models import (ASSISTANT, BOS, CLIP_CONTEXT, EOS, IMAGE, PAD, PREPROCESSOR, USER, WorldSizes, chat_tokenizer,
                     llava_hf_config, save_llava, world_clip_config, write_chat_assets, write_clip_assets)
from .scene import CELL, COLOURS, IMAGE_SIZE, SHAPES, SIZES, Scene, generate_scene, jitter, random_object, render

HELD_OUT = 1_000_000  # first held-out seed
STAGES = ("clip", "vlm", "ngram", "imagine")  # in training order; vlm starts from clip's vision tower


@dataclass
class WorldTrainConfig:
    train_scenes: int = 12000      # seeds [0, train_scenes)
    seed: int = 0                  # model init and batch order
    threads: int = 1               # torch intra-op threads (fixed: reproducible, and fastest for models this small on a shared box)
    device: str = "cpu"
    clip_steps: int = 2500
    clip_batch: int = 64
    clip_lr: float = 2e-3
    clip_siblings: bool = True     # half of each CLIP batch: one-attribute/position variants of the other half
    clip_aux: float = 1.0          # weight of the auxiliary patch-attribute loss (0: contrastive only)
    clip_scene_probe: float = 1.0  # weight of the scene probe on both embeddings (0: none)
    clip_pos_std: float = 1.0      # init std of the vision position embeddings (small, a lone object's cell was never learned)
    vlm_steps: int = 12000
    vlm_batch: int = 16
    vlm_lr: float = 5e-4           # 2e-3 delayed (or missed) the step where the search questions (existence, relation) are learned
    vlm_extra_draws: int = 2       # further question draws whose `vlm_extra_kinds` questions join each conversation
    vlm_extra_kinds: tuple = ("relation", "position")  # the search questions, learned last
    vlm_train_tower: bool = False  # fine-tune the vision tower with the VLM (False: keep world-clip's, frozen; learns faster)
    ngram_order: int = 6
    parallel: bool = True          # imagine in a second process beside the other stages (2 cores: one each)
    progress: bool = True
    sizes: WorldSizes = field(default_factory=WorldSizes)
    imagine: ImagineTrainConfig = field(default_factory=ImagineTrainConfig)  # text-to-image stage


def world_images(seeds) -> list:
    return [render(generate_scene(s)) for s in seeds]


def sibling(scene: Scene, rng: np.random.Generator) -> Scene:
    """A scene that differs from `scene` in one thing (an object's size, colour or shape; an object
    moved to an empty cell; two objects swapped; an object added or removed), its caption too:
    in-batch hard negatives that teach the CLIP to bind attributes to positions."""
    objs = list(scene.objects)
    empty = [c for c in range(4) if scene.at(c) is None]
    moves = ["attribute"] + (["move", "add"] if empty else []) + (["swap", "remove"] if len(objs) > 1 else [])
    move = moves[int(rng.integers(len(moves)))]
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if move == "attribute":
        field, values = [("size", tuple(SIZES)), ("colour", COLOURS), ("shape", SHAPES)][int(rng.integers(3))]
        others = [v for v in values if v != getattr(o, field)]
        objs[i] = replace(o, **{field: others[int(rng.integers(len(others)))]})
    elif move == "move":
        objs[i] = replace(o, cell=empty[int(rng.integers(len(empty)))])
    elif move == "add":
        objs.append(random_object(rng, empty[int(rng.integers(len(empty)))]))
    elif move == "remove":
        objs.pop(i)
    else:
        j = (i + 1 + int(rng.integers(len(objs) - 1))) % len(objs)
        if (o.size, o.colour, o.shape) == (objs[j].size, objs[j].colour, objs[j].shape):
            return sibling(scene, rng)  # swapping twins changes nothing
        objs[i], objs[j] = replace(o, cell=objs[j].cell), replace(objs[j], cell=o.cell)
    objs = tuple(sorted(objs))
    return Scene(objs, jitter(rng, objs))


SCENE_PROBE_SCALE = 10.0  # the scene probe reads unit vectors: scaled, its logits can leave zero at the lr of the rest
CELL_CLASSES = (1 + len(COLOURS), 1 + len(SHAPES), 1 + len(SIZES))  # colour, shape, size of a cell's object (0: none)


def cell_labels(scene: Scene) -> np.ndarray:
    """(4, 3) int64: the colour, shape and size class of each grid cell's object (0 where empty)."""
    cells = np.zeros((4, 3), np.int64)
    for o in scene.objects:
        cells[o.cell] = (1 + COLOURS.index(o.colour), 1 + SHAPES.index(o.shape), 1 + tuple(SIZES).index(o.size))
    return cells


def probe_heads(sizes: WorldSizes) -> nn.ModuleDict:
    """The linear probes of the CLIP stage (dropped after training): "patch" reads a patch's cell
    attributes from the tower's last hidden state, "scene" every cell's from an embedding."""
    return nn.ModuleDict({"patch": nn.Linear(sizes.vision_width, sum(CELL_CLASSES)),
                          "scene": nn.Linear(sizes.embed_dim, 4 * sum(CELL_CLASSES))})


def attribute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, N, sum(CELL_CLASSES)) against labels (B, N, 3): the sum of the colour, shape and
    size cross-entropies."""
    return sum(F.cross_entropy(z.flatten(0, 1), labels[..., k].flatten())
               for k, z in enumerate(logits.split(CELL_CLASSES, dim=-1)))


def patch_labels(scene: Scene, patch: int) -> np.ndarray:
    """(N, 3) int64: for each patch in reading order, `cell_labels` of the grid cell the patch lies
    in: the auxiliary targets."""
    side = IMAGE_SIZE // patch
    r, c = np.divmod(np.arange(side * side), side)
    return cell_labels(scene)[(r * patch // CELL) * 2 + c * patch // CELL]


def clip_batches(cfg: WorldTrainConfig, tokenizer, proc):
    """Endless batches (pixels (B, 3, H, W), ids (B, T), patch labels (B, N, 3), cell labels (B, 4, 3)):
    B / 2 training scenes and a sibling of each (`sibling`), so every batch holds pairs that differ
    in one attribute or position."""
    scenes = [generate_scene(s) for s in range(cfg.train_scenes)]
    rng = np.random.default_rng(cfg.seed + 3)
    if cfg.clip_siblings:
        scenes += [sibling(s, rng) for s in scenes]
    images = np.stack([render(s) for s in scenes])  # (N, H, W, 3) uint8
    ids, _ = tokenizer([caption(s) for s in scenes])
    labels = torch.from_numpy(np.stack([patch_labels(s, cfg.sizes.patch) for s in scenes]))
    cells = torch.from_numpy(np.stack([cell_labels(s) for s in scenes]))
    half = cfg.clip_batch // 2 if cfg.clip_siblings else cfg.clip_batch
    n = cfg.train_scenes
    while True:
        order = rng.permutation(n)
        for s in range(0, n - half + 1, half):
            idx = order[s:s + half]
            if cfg.clip_siblings:
                idx = np.concatenate([idx, idx + n])
            t = torch.as_tensor(idx)
            yield proc(list(images[idx])), ids[t], labels[t], cells[t]


def clip_step_loss(model: ClipModel, heads: nn.ModuleDict, batch, cfg: WorldTrainConfig) -> torch.Tensor:
    """The contrastive loss (mmfuse.kernels), plus `cfg.clip_aux` x the patch-attribute cross-entropy of a
    linear probe on the tower's last hidden states (the features the VLM reads), plus
    `cfg.clip_scene_probe` x the cross-entropy of one linear probe reading every cell's attributes from
    the image embedding and from the text embedding: it binds each object to its cell in both, which
    is what retrieval among near-identical captions needs (bench/README.md)."""
    pixels, ids, labels, cells = batch
    x = model.image_tower.hidden_states(pixels, [-1])[0]  # (B, 1 + N, C)
    img = F.normalize(model.image_proj(model.image_tower.norm_post(x[:, 0])), dim=-1)  # (B, E)
    txt = F.normalize(model.text_features(ids), dim=-1)  # (B, E)
    loss = contrastive_loss(model, img, txt)
    if cfg.clip_aux:
        loss = loss + cfg.clip_aux * attribute_loss(heads["patch"](x[:, 1:]), labels)  # logits (B, N, classes)
    if cfg.clip_scene_probe:
        for emb in (img, txt):
            z = heads["scene"](SCENE_PROBE_SCALE * emb).unflatten(-1, (4, -1))  # (B, 4 cells, classes)
            loss = loss + cfg.clip_scene_probe * attribute_loss(z, cells)
    return loss


def train_clip(cfg: WorldTrainConfig, out: Path) -> ClipModel:
    folder = out / "clip"
    vocab = write_clip_assets(folder)
    proc = ImageProcessor.from_config(PREPROCESSOR)
    model = ClipModel.random(world_clip_config(vocab, cfg.sizes), seed=cfg.seed)
    nn.init.normal_(model.image_tower.pos_embed, std=cfg.clip_pos_std)
    model.to(cfg.device)
    heads = probe_heads(cfg.sizes).to(cfg.device)
    tc = TrainConfig(steps=cfg.clip_steps, lr=cfg.clip_lr, warmup_steps=max(1, cfg.clip_steps // 20),
                     weight_decay=0.05, progress=cfg.progress)
    both = nn.ModuleDict({"clip": model, "heads": heads})
    opt = make_optimizer(both, tc)
    batches = clip_batches(cfg, TextTokenizer(folder, CLIP_CONTEXT), proc)
    model.train()
    bar = tqdm(range(tc.steps), disable=not tc.progress, desc="clip", dynamic_ncols=True)
    for step in bar:
        batch = [t.to(cfg.device) for t in next(batches)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        opt.zero_grad(set_to_none=True)
        loss = clip_step_loss(model, heads, batch, cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(both.parameters(), tc.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, tc.max_logit_scale)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    model.save_pretrained(folder)
    return model


def conversation_ids(tok, turns, tokens_per_image: int) -> tuple:
    """Token ids and labels of a chat about one image, as the chat template renders it:
    <s> USER: <image>*n q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT: a2 </s> ...; labels on answers and </s>."""
    v = tok.token_to_id
    ids, labels = [v(BOS)], [IGNORE]
    for i, (q, a) in enumerate(turns):
        prompt = [v(USER)] + ([v(IMAGE)] * tokens_per_image if i == 0 else []) + [v(w) for w in q.split()] + [v(ASSISTANT)]
        answer = [v(w) for w in a.split()] + [v(EOS)]
        ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
    return ids, labels


def scene_turns(seed: int, rng: np.random.Generator, draw: int = 0, extra_draws: int = 0, extra_kinds=()) -> list:
    """The caption and one question of each type about scene `seed` (`questions`' draw `draw`), plus
    the questions of kinds `extra_kinds` of `extra_draws` further draws, shuffled by `rng`."""
    scene = generate_scene(seed)
    qas = list(questions(scene, seed, draw))
    for j in range(extra_draws):  # draws from 1000 (draw + 1) on: apart from the epochs' draws (< 1000)
        qas += [qa for qa in questions(scene, seed, (draw + 1) * 1000 + j) if qa.kind in extra_kinds]
    turns = [(CAPTION_PROMPT, caption(scene))] + [(qa.question, qa.answer) for qa in qas]
    return [turns[i] for i in rng.permutation(len(turns))]


def build_vlm(cfg: WorldTrainConfig, clip: ClipModel, tok) -> tuple:
    s = cfg.sizes
    text = llama_decoder_config(tok.get_vocab_size(), s.lm_width, s.lm_layers, s.lm_heads, s.lm_ff, s.lm_context,
                                bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS))
    hf = llava_hf_config(clip.hf_config, text, tok.token_to_id(IMAGE))
    vcfg = VlmConfig.from_hf(hf)
    torch.manual_seed(cfg.seed)
    model = LlavaModel(vcfg)
    init_weights(model.projector)
    init_weights(model.decoder)
    missing, unexpected = model.tower.load_state_dict(clip.image_tower.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("norm_post", "pool")) for k in missing), (missing, unexpected)
    return model.to(cfg.device), hf


def vlm_loss(model: LlavaModel, batch) -> torch.Tensor:
    ids, labels, pixels = batch
    feats = model.tile_features(pixels)  # (B, n, d)
    x = model.embed_prompt(ids, feats.reshape(-1, feats.shape[-1]))  # (B, T, d)
    return next_token_loss(model.decoder, ids, labels, embeds=x)


def vlm_batches(cfg: WorldTrainConfig, tok, tokens_per_image: int, pixels: torch.Tensor):
    """Endless shuffled batches (ids (B, T), labels (B, T), pixels (B, 3, H, W)); each epoch asks
    every scene new questions (draw = epoch) and shuffles the turns anew. Fresh questions matter: with
    the same ones every epoch the yes/no and search questions stayed at chance (bench/README.md)."""
    rng = np.random.default_rng(cfg.seed + 1)
    pad = tok.token_to_id(PAD)
    epoch = 0
    while True:
        order = rng.permutation(cfg.train_scenes)
        for s in range(0, len(order) - cfg.vlm_batch + 1, cfg.vlm_batch):
            idx = order[s:s + cfg.vlm_batch]
            rows = [conversation_ids(tok, scene_turns(int(i), rng, epoch, cfg.vlm_extra_draws, cfg.vlm_extra_kinds),
                                     tokens_per_image) for i in idx]
            T = max(len(r[0]) for r in rows)
            ids = torch.full((len(rows), T), pad, dtype=torch.long)
            labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
            for j, (a, b) in enumerate(rows):
                ids[j, :len(a)], labels[j, :len(b)] = torch.tensor(a), torch.tensor(b)
            yield ids.to(cfg.device), labels.to(cfg.device), pixels[torch.as_tensor(idx)].to(cfg.device)
        epoch += 1


def train_vlm(cfg: WorldTrainConfig, out: Path, clip: ClipModel) -> LlavaModel:
    folder = out / "vlm"
    tok = chat_tokenizer()
    write_chat_assets(folder, tok)
    model, hf = build_vlm(cfg, clip, tok)
    model.tower.requires_grad_(cfg.vlm_train_tower)
    pixels = ImageProcessor.from_config(PREPROCESSOR)(world_images(range(cfg.train_scenes)))
    dc = DecoderTrainConfig(steps=cfg.vlm_steps, lr=cfg.vlm_lr, warmup_steps=max(1, cfg.vlm_steps // 20),
                            weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8, progress=cfg.progress, desc="vlm")
    train_decoder(model, vlm_batches(cfg, tok, model.cfg.tokens_per_image, pixels), dc, loss_fn=vlm_loss)
    save_llava(model, folder, hf)
    return model


def answer_corpus(cfg: WorldTrainConfig, tok) -> list:
    """The VLM's answer streams (ASSISTANT: answer </s>) of every training scene, as token id rows."""
    rng = np.random.default_rng(cfg.seed + 2)
    v = tok.token_to_id
    rows = []
    for s in range(cfg.train_scenes):
        for q, a in scene_turns(s, rng):
            rows.append(np.array([v(w) for w in q.split()] + [v(ASSISTANT)] + [v(w) for w in a.split()] + [v(EOS)]))
    return rows


def train_ngram(cfg: WorldTrainConfig, out: Path):
    from ..ngram import NGramModel

    folder = out / "ngram"
    folder.mkdir(parents=True, exist_ok=True)
    tok = chat_tokenizer()
    # lmplz's fallback discounts apply only where estimation fails: a corpus of a few scenes (tests)
    lm = NGramModel.build(answer_corpus(cfg, tok), order=cfg.ngram_order, discount_fallback=(0.5, 1.0, 1.5))
    lm.save(folder / "answers.bin")
    write_chat_assets(folder, tok, chat_template=False)
    return lm


def train_imagine_stage(cfg: WorldTrainConfig, out: Path) -> None:
    seeds = range(cfg.train_scenes)
    train_imagine(cfg.imagine, out / "imagine", np.stack(world_images(seeds)),
                  [caption(generate_scene(s)) for s in seeds], device=cfg.device, progress=cfg.progress)


def _imagine_process(cfg: WorldTrainConfig, out: str, conn) -> None:
    """The imagine stage in a second process; sends ("ok", seconds) or ("error", traceback)."""
    try:
        torch.set_num_threads(cfg.threads)
        t = time.perf_counter()
        train_imagine_stage(cfg, Path(out))
        conn.send(("ok", time.perf_counter() - t))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _start_imagine(cfg: WorldTrainConfig, out: Path):
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_imagine_process, args=(cfg, str(out), send), name="mmfuse-imagine", daemon=True)
    proc.start()
    send.close()
    return proc, recv


def _join_imagine(proc, recv) -> float:
    try:
        status, value = recv.recv()
    except EOFError:
        status = None
    finally:
        proc.join()
    if status is None:
        raise RuntimeError(f"the imagine stage's process died (exit code {proc.exitcode})")
    if status != "ok":
        raise RuntimeError(f"the imagine stage failed in its process:\n{value}")
    return value


def train_world(out, cfg: WorldTrainConfig = WorldTrainConfig(), command=None, stages=STAGES) -> dict:
    """Train the models of `stages` (default: all) into `out` (clip/, vlm/, ngram/, imagine/,
    training.json); returns {model: seconds}. With `cfg.parallel`, imagine (independent of the
    others) trains in a second process beside clip -> vlm -> ngram: each process is seeded and
    single-threaded, so the weights are the same as in sequence, in about half the wall time."""
    out = Path(out)
    bad = [s for s in stages if s not in STAGES]
    if bad or ("vlm" in stages and "clip" not in stages):
        raise ValueError(f"stages {list(stages)}: choose from {STAGES} (vlm needs clip)")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    load = [os.getloadavg()[0]]
    times = {}
    clip = None
    start = time.perf_counter()
    side = _start_imagine(cfg, out) if cfg.parallel and "imagine" in stages and len(set(stages)) > 1 else None
    try:
        for stage in (s for s in STAGES if s in stages):
            t = time.perf_counter()
            if stage == "clip":
                clip = train_clip(cfg, out)
            elif stage == "vlm":
                train_vlm(cfg, out, clip)
            elif stage == "ngram":
                train_ngram(cfg, out)
            elif side is None:
                train_imagine_stage(cfg, out)
            else:
                continue
            times[stage] = time.perf_counter() - t
        if side is not None:
            times["imagine"] = _join_imagine(*side)
    finally:
        if side is not None and side[0].is_alive():  # a stage of this process failed
            side[0].terminate()
            side[0].join()
    load.append(os.getloadavg()[0])
    write_json(out / "training.json", {"command": command or f"mmfuse world train --out {out}",
                                       "config": asdict(cfg), "seconds": times,
                                       "wall_seconds": time.perf_counter() - start,
                                       "parallel": ["imagine"] if side is not None else [],
                                       "held_out_from_seed": HELD_OUT,
                                       "load_average": "{:.1f} at the start, {:.1f} at the end".format(*load),
                                       "torch": torch.__version__})
    return times
