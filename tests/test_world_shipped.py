"""The shipped world models: they load by name, answer as transformers' LlavaForConditionalGeneration
does (greedy), run through `mmfuse demo` / `chat` / `embed`, and match the model card's checksums."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mmfuse.cli import main
from mmfuse.world.card import sha256
from mmfuse.world.language import CAPTION_PROMPT, questions
from mmfuse.world.scene import generate_scene, render
from mmfuse.world.load import load
from mmfuse.world.shipped import ROOT, shipped_path
from mmfuse.world.train import HELD_OUT


@pytest.fixture(scope="module")
def vlm():
    return load("world-vlm")


def test_shipped_vlm_gives_the_greedy_answers_of_transformers(vlm):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(shipped_path("world-vlm")).eval()
    for seed in (HELD_OUT + 7, HELD_OUT + 8):
        scene = generate_scene(seed)
        for q in (CAPTION_PROMPT, questions(scene, seed)[0].question):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            p = vlm.prepare(msgs, [render(scene)])
            ids = torch.tensor([list(p)])
            pixels = torch.from_numpy(np.concatenate([im.pixels for im in p.images]))
            with torch.no_grad():
                g = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                max_new_tokens=40, do_sample=False)
            ours = vlm.generate(p, temperature=0.0, max_new_tokens=40)[0]
            assert ours.token_ids == g[0, ids.shape[1]:].tolist(), q


def test_demo_chat_and_embed_run_on_the_shipped_models(tmp_path, capsys):
    assert main(["demo", "--scenes", "2", "--retrieval-scenes", "20", "--speculative", "1", "--imagine", "2", "--json",
                 "-q"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["speculative_identical"] == 1.0 and m["vqa_n"] >= 8 and m["text_to_image_n"] == 2
    Image.fromarray(render(generate_scene(HELD_OUT))).save(tmp_path / "x.png")
    assert main(["chat", "--model", "world-vlm", "--image", str(tmp_path / "x.png"), "--prompt",
                 "how many objects are there", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() in ("zero", "one", "two", "three", "four")
    assert main(["embed", "--model", "world-clip", "--images", str(tmp_path / "x.png"), "--out",
                 str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (1, load("world-clip").embedding_dim)
    assert main(["imagine", "--prompt", "a large red circle at the top left", "--out", str(tmp_path / "i.png"),
                 "--scale", "1"]) == 0
    assert np.asarray(Image.open(tmp_path / "i.png")).shape == (64, 64, 3)


def test_model_card_checksums_and_size():
    card = (ROOT / "MODEL_CARD.md").read_text()
    rows = re.findall(r"^\| (\S+) \| (\d+) \| ([0-9a-f]{64}) \|$", card, flags=re.M)
    assert len(rows) >= 10
    for name, size, digest in rows:
        assert (ROOT / name).stat().st_size == int(size) and sha256(ROOT / name) == digest, name
    assert sum(int(s) for _, s, _ in rows) <= 25_000_000
