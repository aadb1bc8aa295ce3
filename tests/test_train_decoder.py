"""The decoder training loop: the loss is next-token cross-entropy with ignored labels, training
learns, and the saved folder loads in mmfuse and in transformers with the same logits."""
import pytest
import torch

from mmfuse.decoder.loader import load_decoder
from mmfuse.decoder.train import llama_decoder_config
from mmfuse.decoder.train import IGNORE, DecoderTrainConfig, next_token_loss, pad_batch, train_decoder
from mmfuse.decoder.transformer import Decoder


def small(vocab=37, d=48, layers=2, heads=4, tie=False):
    return Decoder.random(llama_decoder_config(vocab, d, layers, heads, 80, 64, bos_token_id=1, eos_token_id=2,
                                               tie_embeddings=tie), seed=3)


def test_loss_is_next_token_cross_entropy_with_ignored_labels():
    model = small()
    ids = torch.randint(0, 37, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = IGNORE
    labels[2, 7:] = IGNORE
    with torch.no_grad():
        logits = model(ids, torch.arange(9).expand(3, 9)).double()
        lp = logits.log_softmax(-1)
        terms = [-lp[b, t, labels[b, t + 1]] for b in range(3) for t in range(8) if labels[b, t + 1] != IGNORE]
        ref = torch.stack(terms).mean()
        assert next_token_loss(model, ids, labels).item() == pytest.approx(ref.item(), rel=1e-5)
    ids2, labels2 = pad_batch([[5, 6, 7], [8, 9]], pad_id=0, prompt_lens=[1, 0])
    assert ids2.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert labels2.tolist() == [[IGNORE, 6, 7], [8, 9, IGNORE]]


def test_training_memorises_sequences_and_greedy_decodes_them(tmp_path):
    torch.manual_seed(0)
    model = small()
    seqs = torch.randint(3, 37, (4, 12), generator=torch.Generator().manual_seed(1))

    def batches():
        while True:
            yield seqs, seqs

    losses = train_decoder(model, batches(), DecoderTrainConfig(steps=150, lr=1e-2, warmup_steps=10, progress=False))
    assert losses[-1] < 0.1 * losses[0]
    with torch.no_grad():  # greedy continuation of each memorised sequence from its first 3 tokens
        for s in seqs:
            ids = s[:3].tolist()
            while len(ids) < 12:
                x = torch.tensor([ids])
                ids.append(int(model(x, torch.arange(len(ids))[None])[0, -1].argmax()))
            assert ids == s.tolist()


@pytest.mark.parametrize("tie", [False, True])
def test_saved_folder_loads_in_mmfuse_and_transformers_with_the_same_logits(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    model = small(tie=tie)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # not the init values
    model.save_pretrained(tmp_path / "m")
    ours = load_decoder(tmp_path / "m")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 37, (2, 11), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        ref = model(ids, pos)
        torch.testing.assert_close(ours(ids, pos), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf(ids).logits, ref, atol=1e-4, rtol=1e-4)
