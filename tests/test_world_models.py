"""The world's models: training writes folders mmfuse and transformers load alike, the training
sequences are what the chat template and processor make, `mmfuse world train` and `mmfuse demo`
run end to end (on a tiny run), and missing shipped files are named with the regenerate command."""
import json

import numpy as np
import pytest
import torch

from mmfuse.cli import main
from mmfuse.errors import MissingModelError, VocabularyError
from mmfuse.vlm.engine import VisionLanguageModel
from mmfuse.world import shipped
from mmfuse.world.imagine_train import ImagineTrainConfig
from mmfuse.world.vq import VQTrainConfig
from mmfuse.world.language import CAPTION_PROMPT, caption, questions
from mmfuse.world.models import chat_tokenizer
from mmfuse.world.scene import generate_scene, render
from mmfuse.world.train import HELD_OUT, WorldTrainConfig, conversation_ids, train_world

TINY = dict(train_scenes=64, clip_steps=3, clip_batch=16, vlm_steps=4, vlm_batch=8, progress=False,
            imagine=ImagineTrainConfig(vq=VQTrainConfig(steps=2, batch=8), steps=2, batch=8, width=32, layers=1))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    n = torch.get_num_threads()
    train_world(out, WorldTrainConfig(**TINY))
    torch.set_num_threads(n)
    return out


def _chat(q):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]


def test_training_sequences_are_what_the_chat_template_and_processor_make(tiny_world):
    vlm = VisionLanguageModel.from_pretrained(tiny_world / "vlm")
    tok = chat_tokenizer()
    k = vlm.vlm.cfg.tokens_per_image
    img = render(generate_scene(5))
    turns = [(CAPTION_PROMPT, caption(generate_scene(5))), ("is there a red circle", "no")]
    ids, labels = conversation_ids(tok, turns, k)
    msgs = _chat(turns[0][0]) + [{"role": "assistant", "content": [{"type": "text", "text": turns[0][1]}]},
                                 {"role": "user", "content": [{"type": "text", "text": turns[1][0]}]}]
    prompt = vlm.prepare(msgs, [img])
    assert list(prompt) == ids[:len(prompt)]                       # everything up to the last answer
    answer = [tok.token_to_id(w) for w in "no".split()] + [tok.token_to_id("</s>")]
    assert ids[len(prompt):] == answer and labels[len(prompt):] == answer
    assert labels[:len(prompt)].count(-100) == len(prompt) - len(turns[0][1].split()) - 1


def test_trained_vlm_loads_in_transformers_with_the_same_logits_and_greedy_answers(tiny_world):
    transformers = pytest.importorskip("transformers")
    vlm = VisionLanguageModel.from_pretrained(tiny_world / "vlm")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_world / "vlm").eval()
    for seed in (HELD_OUT, HELD_OUT + 1):
        img = render(generate_scene(seed))
        p = vlm.prepare(_chat(CAPTION_PROMPT), [img])
        ids = torch.tensor([list(p)])
        pixels = torch.from_numpy(np.concatenate([im.pixels for im in p.images]))
        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values=pixels).logits[0, -1]
            g = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=12, do_sample=False,
                            attention_mask=torch.ones_like(ids))
        ours = vlm.generate(p, temperature=0.0, max_new_tokens=12, logprobs=True)[0]
        assert ours.token_ids == g[0, ids.shape[1]:].tolist()
        lp = torch.log_softmax(ref.double(), -1)[ours.token_ids[0]].item()
        assert ours.logprobs[0] == pytest.approx(lp, abs=1e-4)


def test_world_train_and_demo_commands_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["world", "train", "--out", str(out), "--scenes", "64", "--clip-steps", "2", "--vlm-steps", "2",
                 "--vq-steps", "2", "--imagine-steps", "2", "-q"]) == 0
    for f in ("clip/model.safetensors", "vlm/model.safetensors", "vlm/tokenizer.json", "ngram/answers.bin",
              "imagine/model.safetensors", "imagine/vq.safetensors", "training.json"):
        assert (out / f).is_file(), f
    capsys.readouterr()
    assert main(["demo", "--models", str(out), "--scenes", "3", "--retrieval-scenes", "24", "--speculative", "2",
                 "--imagine", "2", "--json", "--out", str(tmp_path / "report"), "-q"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("vqa", "vqa_count", "caption_attribute_precision", "caption_object_recall", "retrieval_r1",
                "zero_shot_colour", "zero_shot_shape", "speculative_speedup", "text_to_image_parse_match"):
        assert m[key] is None or 0 <= m[key] or key == "speculative_speedup", key
    assert m["speculative_identical"] == 1.0       # speculative greedy decoding gives the greedy tokens
    assert m["retrieval_images"] == 24 and m["caption_n"] == 3 and m["text_to_image_n"] == 2 and m["imagine_ms"] > 0
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("<img") == 3 + 2 and (tmp_path / "report" / "images" / f"scene-{HELD_OUT}.png").is_file()
    assert (tmp_path / "report" / "images" / f"imagined-{HELD_OUT + 1}.png").is_file()


def test_missing_shipped_file_names_it_and_the_regenerate_command(tmp_path, monkeypatch, capsys):
    with pytest.raises(MissingModelError, match="world train") as e:
        shipped.shipped_path("world-vlm", root=tmp_path)
    assert str(tmp_path / "vlm" / "config.json") in str(e.value)
    with pytest.raises(MissingModelError, match="not a shipped model"):
        shipped.shipped_path("world-gpt")
    monkeypatch.setattr(shipped, "ROOT", tmp_path)
    assert main(["chat", "--model", "world-vlm", "--image", "x.png", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "mmfuse world train" in err


def test_words_outside_the_world_are_refused_before_model_work():
    from mmfuse.world.language import VOCABULARY, scene_from_caption

    with pytest.raises(VocabularyError, match="dragon"):
        scene_from_caption("a large red dragon at the top left")
    assert all(VOCABULARY.check(qa.question) for qa in questions(generate_scene(1), 1))


def _differences(a, b) -> int:
    """Attribute slots (presence, size, colour, shape per cell) in which two scenes differ."""
    n = 0
    for cell in range(4):
        x, y = a.at(cell), b.at(cell)
        if (x is None) != (y is None):
            n += 1
        elif x is not None:
            n += sum(getattr(x, k) != getattr(y, k) for k in ("size", "colour", "shape"))
    return n


def test_sibling_scenes_differ_in_one_attribute_or_position():
    from mmfuse.world.train import sibling

    rng = np.random.default_rng(7)
    kinds = set()
    for seed in range(300):
        scene = generate_scene(seed)
        sib = sibling(scene, rng)
        assert caption(sib) != caption(scene) and len(sib.offsets) == len(sib.objects)
        d, moved = _differences(scene, sib), len(sib.objects) - len(scene.objects)
        same_objects = sorted((o.size, o.colour, o.shape) for o in scene.objects) == \
            sorted((o.size, o.colour, o.shape) for o in sib.objects)
        if moved:                                  # an object added or removed
            assert abs(moved) == 1 and d == 1
        elif same_objects:                         # moved to an empty cell or swapped with another
            assert {o.cell for o in sib.objects} != {o.cell for o in scene.objects} or d >= 2
        else:                                      # one attribute of one object changed
            assert d == 1
        kinds.add("add" if moved > 0 else "remove" if moved < 0 else "move" if same_objects else "attribute")
    assert kinds == {"add", "remove", "move", "attribute"}


def test_patch_labels_give_each_patch_its_cell_object():
    from mmfuse.world.scene import Obj, Scene
    from mmfuse.world.train import patch_labels

    scene = Scene((Obj(1, "large", "green", "triangle"), Obj(2, "small", "red", "circle")))
    got = patch_labels(scene, 16)                  # 4 x 4 patches, each cell 2 x 2 of them
    assert got.shape == (16, 3)
    green_triangle_large, red_circle_small = [2, 3, 2], [1, 1, 1]
    assert got[2].tolist() == got[7].tolist() == green_triangle_large   # top right cell
    assert got[8].tolist() == got[13].tolist() == red_circle_small      # bottom left cell
    assert got[0].tolist() == got[15].tolist() == [0, 0, 0]             # empty cells
    assert (patch_labels(scene, 8)[[7, 56]] == np.array([green_triangle_large, red_circle_small])).all()


def test_scene_probe_loss_reads_every_cell_from_both_embeddings(tmp_path):
    """clip_step_loss = contrastive + patch probe + w x (scene probe CE on the image embedding + on the
    text embedding), the scene probe's targets being `cell_labels` (checked against a plain sum)."""
    import torch.nn.functional as F

    from mmfuse.encoders.clip import ClipModel
    from mmfuse.encoders.preprocess import ImageProcessor
    from mmfuse.encoders.tokens import TextTokenizer
    from mmfuse.world.models import CLIP_CONTEXT, PREPROCESSOR, world_clip_config, write_clip_assets
    from mmfuse.world.scene import Obj, Scene
    from mmfuse.world.train import (CELL_CLASSES, SCENE_PROBE_SCALE, cell_labels, clip_batches, clip_step_loss,
                                     probe_heads)

    scene = Scene((Obj(1, "large", "green", "triangle"), Obj(2, "small", "red", "circle")))
    assert cell_labels(scene).tolist() == [[0, 0, 0], [2, 3, 2], [1, 1, 1], [0, 0, 0]]
    cfg = WorldTrainConfig(train_scenes=10, clip_batch=8, progress=False)
    vocab = write_clip_assets(tmp_path)
    model = ClipModel.random(world_clip_config(vocab, cfg.sizes), seed=3)
    heads = probe_heads(cfg.sizes)
    batch = next(clip_batches(cfg, TextTokenizer(tmp_path, CLIP_CONTEXT), ImageProcessor.from_config(PREPROCESSOR)))
    pixels, ids, _, cells = batch
    assert cells.shape == (8, 4, 3) and (cells[:, :, 0] > 0).any(1).all()   # every scene has an object
    base = clip_step_loss(model, heads, batch, WorldTrainConfig(clip_scene_probe=0.0))
    got = clip_step_loss(model, heads, batch, WorldTrainConfig(clip_scene_probe=0.5))
    img, txt = model(pixels, ids)                  # normalised embeddings (B, E)
    w, b = heads["scene"].weight.double(), heads["scene"].bias.double()
    ref = 0.0
    for emb in (img, txt):
        z = (SCENE_PROBE_SCALE * emb.double() @ w.T + b).view(8, 4, -1)
        start = 0
        for k, n in enumerate(CELL_CLASSES):
            for row in range(8):
                for cell in range(4):
                    logp = F.log_softmax(z[row, cell, start:start + n], dim=-1)
                    ref -= logp[cells[row, cell, k]].item() / 32
            start += n
    torch.testing.assert_close((got - base).double(), torch.tensor(0.5 * ref, dtype=torch.float64), rtol=1e-4, atol=1e-5)
