"""Text-to-image: the VQ tokenizer's round trips and files, classifier-free guidance in the engine
against a plain no-cache reference, the `mmfuse imagine` command on a tiny quickly trained model,
the vocabulary error, and the decoder folder loading in transformers' LlamaForCausalLM."""
import json

import numpy as np
import pytest
import torch

from mmfuse.cli import main
from mmfuse.decoder.config import DecoderConfig
from mmfuse.decoder.generate import Engine
from mmfuse.decoder.transformer import Decoder
from mmfuse.errors import CheckpointError, MissingModelError, VocabularyError
from mmfuse.generation.processors import AllowedTokens, ClassifierFreeGuidance, chain, guidance_params
from mmfuse.generation.params import SamplingParams
from mmfuse.world.card import merge_training
from mmfuse.world.imagine import Imaginer, prompt_ids
from mmfuse.world.imagine_train import ImagineTrainConfig, train_imagine
from mmfuse.world.language import caption
from mmfuse.world.scene import BACKGROUND, PALETTE, generate_scene, render
from mmfuse.world.train import HELD_OUT, train_world
from mmfuse.world.vq import VQConfig, VQTokenizer, VQTrainConfig

TINY_T2I = ImagineTrainConfig(vq=VQTrainConfig(steps=4, batch=8), vq_sizes=VQConfig(width=24, stem=8, mask_codes=5,
                              code_dim=6, layers=1), steps=4, batch=8, width=32, layers=2, heads=2, ff=48)


def _images(seeds):
    return np.stack([render(generate_scene(int(s))) for s in seeds])


@pytest.fixture(scope="module")
def tiny_imagine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagine")
    seeds = range(48)
    train_imagine(TINY_T2I, folder, _images(seeds), [caption(generate_scene(s)) for s in seeds], progress=False)
    return folder


@pytest.mark.parametrize("patch,codes", [(4, 37), (16, 11)])
def test_vq_round_trip_shapes_colours_and_determinism(patch, codes):
    torch.manual_seed(patch)
    vq = VQTokenizer(VQConfig(patch=patch, stem=6, width=10, mask_codes=codes, code_dim=5, layers=1)).eval()
    imgs = _images(np.random.default_rng(patch).integers(0, 10**6, size=3))
    c = vq.encode(imgs)
    g = 64 // patch
    assert c.shape == (3, g, g) and c.dtype == torch.int64 and int(c.max()) < 7 * codes
    assert torch.equal(c, vq.encode(imgs))
    # the colour factor of each code is its block's object colour (blocks lie inside one grid cell)
    names = [None, *PALETTE]
    for b, img in enumerate(imgs):
        for r in range(g):
            for q in range(g):
                block = img[r * patch:(r + 1) * patch, q * patch:(q + 1) * patch].reshape(-1, 3)
                seen = {names.index(k) for px in map(tuple, block.tolist()) for k, v in PALETTE.items() if v == px}
                assert len(seen) <= 1 and int(c[b, r, q]) // codes == (seen.pop() if seen else 0)
    out = vq.decode(c)
    assert out.shape == (3, 64, 64, 3) and out.dtype == np.uint8
    allowed = {tuple(BACKGROUND), *map(tuple, PALETTE.values())}
    assert set(map(tuple, out.reshape(-1, 3).tolist())) <= allowed   # decoding picks the world's colours
    assert np.array_equal(out, vq.decode(c.reshape(3, -1)))
    with pytest.raises(ValueError, match="outside"):
        vq.decode(torch.full((1, g, g), 7 * codes))


def test_vq_save_load_round_trip_and_bad_files(tmp_path):
    torch.manual_seed(1)
    vq = VQTokenizer(VQConfig(patch=8, stem=6, width=12, mask_codes=19, code_dim=3, layers=2)).eval()
    vq.save(tmp_path)
    back = VQTokenizer.load(tmp_path)
    imgs = _images([3, 4])
    assert torch.equal(back.encode(imgs), vq.encode(imgs))
    assert np.array_equal(back.decode(vq.encode(imgs)), vq.decode(vq.encode(imgs)))
    cfg = json.loads((tmp_path / "vq.json").read_text())
    (tmp_path / "vq.json").write_text(json.dumps({**cfg, "widht": 3}))
    with pytest.raises(CheckpointError, match="widht"):
        VQTokenizer.load(tmp_path)
    (tmp_path / "vq.json").write_text(json.dumps({**cfg, "width": 13}))
    with pytest.raises(CheckpointError, match="vq.safetensors"):
        VQTokenizer.load(tmp_path)
    with pytest.raises(MissingModelError, match="vq.json"):
        VQTokenizer.load(tmp_path / "nowhere")


def _tiny_engine(seed=0, vocab=29):
    cfg = DecoderConfig(vocab_size=vocab, n_layer=2, n_head=3, n_kv_head=1, d_model=24, head_dim=8, d_ff=40,
                        max_seq_len=64, family="llama", norm="rmsnorm", act="silu", gated_mlp=True, learned_pos=False,
                        qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=False, eos_token_ids=(1,))
    return Engine(Decoder.random(cfg, seed=seed))


def _reference_cfg_greedy(model, cond, uncond, scale, n, lo, hi):
    """Plain loop: full forward of both sequences without a cache, mix, mask, argmax."""
    c, u, out = list(cond), list(uncond), []
    with torch.no_grad():
        for _ in range(n):
            lc = model(torch.tensor([c]), torch.arange(len(c))[None])[0, -1].double()
            lu = model(torch.tensor([u]), torch.arange(len(u))[None])[0, -1].double()
            mixed = lu + scale * (lc - lu)
            t = lo + int(mixed[lo:hi].argmax())
            out.append(t)
            c.append(t)
            u.append(t)
    return out


def test_classifier_free_guidance_matches_a_plain_no_cache_reference():
    eng = _tiny_engine()
    conds = [[2, 5, 7, 11, 3], [2, 9, 3]]
    unconds = [[2, 3], [2, 3]]
    lo, hi = 13, 29
    proc = chain(ClassifierFreeGuidance(2.5), AllowedTokens(lo, hi))
    p = SamplingParams(temperature=0.0, max_new_tokens=9)
    out = eng.generate(conds + unconds, guidance_params([p, p]), ignore_eos=True, logits_processor=proc)
    for b in range(2):
        ref = _reference_cfg_greedy(eng.model, conds[b], unconds[b], 2.5, 9, lo, hi)
        assert out[b].token_ids == ref and out[b + 2].token_ids == ref
    # guidance 1 is the conditional model: the same greedy tokens as conditional rows alone
    one = eng.generate(conds + unconds, guidance_params([p, p]), ignore_eos=True,
                       logits_processor=chain(ClassifierFreeGuidance(1.0), AllowedTokens(lo, hi)))
    plain = eng.generate(conds, p, ignore_eos=True, logits_processor=AllowedTokens(lo, hi))
    assert [o.token_ids for o in one[:2]] == [o.token_ids for o in plain]
    assert all(lo <= t < hi for o in out for t in o.token_ids)


def test_guided_sampling_keeps_each_pair_on_one_sequence_and_is_seeded():
    eng = _tiny_engine(seed=3)
    conds, unconds = [[2, 5, 7], [2, 8, 8, 4], [2, 6]], [[2], [2], [2]]
    params = [SamplingParams(temperature=1.3, top_k=7, top_p=0.9, seed=s, max_new_tokens=12) for s in (4, 5, None)]
    proc = ClassifierFreeGuidance(4.0)
    runs = [eng.generate(conds + unconds, guidance_params(params), ignore_eos=True, logits_processor=proc)
            for _ in range(2)]
    for out in runs:
        assert all(out[b].token_ids == out[b + 3].token_ids for b in range(3))
    assert [o.token_ids for o in runs[0][:2]] == [o.token_ids for o in runs[1][:2]]
    with pytest.raises(ValueError, match="unconditional"):
        eng.generate(conds, params[:1] * 3, ignore_eos=True, logits_processor=proc)


def test_imagine_with_guidance_one_is_conditional_sampling(tiny_imagine):
    im = Imaginer.from_pretrained(tiny_imagine)
    caps = [caption(generate_scene(HELD_OUT + i)) for i in range(3)]
    codes = im.tokens(caps, 1.0, [SamplingParams(temperature=0.8, seed=10 + b) for b in range(3)])
    lo = im.first_image_id
    plain = im.engine.generate([prompt_ids(im.engine.tokenizer, c) for c in caps],
                               [SamplingParams(temperature=0.8, seed=10 + b, max_new_tokens=im.vq.cfg.tokens)
                                for b in range(3)], ignore_eos=True, logits_processor=AllowedTokens(lo, lo + im.codebook_size))
    assert torch.equal(codes, torch.tensor([o.token_ids for o in plain]) - lo)
    imgs = im.imagine(caps, seed=10, temperature=0.8, guidance=1.0)
    assert np.array_equal(imgs, im.vq.decode(codes))
    assert np.array_equal(im.imagine(caps[1], seed=11, temperature=0.8, guidance=1.0), imgs[1])
    guided = im.imagine(caps, seed=10, guidance=3.0)
    assert guided.shape == (3, 64, 64, 3) and np.array_equal(guided, im.imagine(caps, seed=10, guidance=3.0))


def test_imagine_command_end_to_end_and_vocabulary_error(tiny_imagine, tmp_path, capsys):
    from PIL import Image

    cap = caption(generate_scene(HELD_OUT + 5))
    out = tmp_path / "a.png"
    args = ["imagine", "--prompt", cap, "--out", str(out), "--model", str(tiny_imagine), "--seed", "7"]
    assert main(args) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (256, 256, 3)
    expect = Imaginer.from_pretrained(tiny_imagine).imagine(cap, seed=7)
    assert np.array_equal(img[::4, ::4], expect)
    assert main(args[:-1] + ["8", "--guidance", "1", "--temperature", "0", "--scale", "1"]) == 0
    assert np.asarray(Image.open(out)).shape == (64, 64, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]           # written atomically, nothing left over
    capsys.readouterr()
    bad = tmp_path / "b.png"
    assert main(["imagine", "--prompt", "a large red dragon at the top left", "--out", str(bad), "--model",
                 str(tiny_imagine)]) == 2
    assert "dragon" in capsys.readouterr().err and not bad.exists()
    with pytest.raises(VocabularyError, match="dragon"):
        Imaginer.from_pretrained(tiny_imagine).imagine("a red dragon")


def test_imagine_decoder_loads_in_transformers_with_the_same_logits(tiny_imagine):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_imagine).eval()
    im = Imaginer.from_pretrained(tiny_imagine)
    ids = prompt_ids(im.engine.tokenizer, caption(generate_scene(HELD_OUT))) + [im.first_image_id + 3]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0]
        ours = im.engine.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
        g = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    mine = im.engine.generate(ids, temperature=0.0, max_new_tokens=8, ignore_eos=True)[0]
    assert mine.token_ids == g[0, len(ids):].tolist()


def test_world_train_stage_selection_and_partial_install_merge(tmp_path):
    from mmfuse.world import cli, train

    assert cli.STAGES == train.STAGES
    with pytest.raises(ValueError, match="vlm needs clip"):
        train_world(tmp_path, stages=("vlm",))
    with pytest.raises(ValueError, match="choose from"):
        train_world(tmp_path, stages=("dalle",))
    old = {"command": "mmfuse world train --out A", "seconds": {"clip": 1.0, "vlm": 2.0, "imagine": 9.0},
           "config": {"seed": 0, "imagine": {"steps": 1}}}
    new = {"command": "mmfuse world train --out B --only imagine", "seconds": {"imagine": 3.0},
           "config": {"seed": 0, "imagine": {"steps": 2}}}
    m = merge_training(old, new)
    assert m["seconds"] == {"clip": 1.0, "vlm": 2.0, "imagine": 3.0} and m["config"]["imagine"] == {"steps": 2}
    assert m["command"] == old["command"] and m["stage_commands"] == {"imagine": new["command"]}
    assert old["seconds"]["imagine"] == 9.0                                   # the shipped record is not mutated
    vlm = {"command": "mmfuse world train --out C --only clip vlm", "seconds": {"clip": 4.0, "vlm": 5.0},
           "config": {"seed": 1, "vlm_lr": 0.1, "imagine": {"steps": 7}}}
    m = merge_training(m, vlm)
    assert m["config"] == {"seed": 1, "vlm_lr": 0.1, "imagine": {"steps": 2}}  # its settings, the imagine run's
    assert m["stage_commands"] == {"imagine": new["command"], "clip": vlm["command"], "vlm": vlm["command"]}


def test_imagine_in_a_second_process_gives_the_sequential_bytes_and_reports_failures(tmp_path):
    """`world train` runs imagine beside the other stages: the same weights as in sequence (seeded,
    single-threaded processes), its time and wall clock recorded, and a failure in the second process
    raised here with its traceback (not a hang)."""
    from dataclasses import replace

    from mmfuse.world.train import WorldTrainConfig

    cfg = WorldTrainConfig(train_scenes=24, progress=False, imagine=replace(TINY_T2I, steps=3))
    n = torch.get_num_threads()
    try:
        train_world(tmp_path / "par", cfg, stages=("ngram", "imagine"))
        train_world(tmp_path / "seq", replace(cfg, parallel=False), stages=("ngram", "imagine"))
        for name in ("imagine/model.safetensors", "imagine/vq.safetensors", "ngram/answers.bin"):
            assert (tmp_path / "par" / name).read_bytes() == (tmp_path / "seq" / name).read_bytes(), name
        par = json.loads((tmp_path / "par" / "training.json").read_text())
        seq = json.loads((tmp_path / "seq" / "training.json").read_text())
        assert par["parallel"] == ["imagine"] and seq["parallel"] == []
        assert set(par["seconds"]) == {"ngram", "imagine"} and par["wall_seconds"] > 0
        with pytest.raises(RuntimeError, match="imagine stage failed(.|\n)*steps=0 must be positive"):
            train_world(tmp_path / "bad", replace(cfg, imagine=replace(TINY_T2I, steps=0)), stages=("ngram", "imagine"))
    finally:
        torch.set_num_threads(n)
