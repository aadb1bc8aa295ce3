"""Incremental detokenization against one-shot `Tokenizer.decode`, on tokenizers the test trains
(byte-level BPE as GPT-2, and a Metaspace BPE whose decoder strips the first leading space as
SentencePiece does), and stop-string matching over streamed pieces."""
import json
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mmfuse.generation.detokenize import IncrementalDecoder, StopStringMatcher

WORDS = ["naïve", "café", "日本語", "emoji", "🙂", "🙃", "über", "straße", "ünïcödé", "中文字", "hello",
         "world", "the", "quick", "brown", "fox", "ǅ", "€100", "ｆｕｌｌ", "a\nb", "  ", "\t", "—"]
SPECIAL = "<|endoftext|>"


def corpus(seed, lines=300):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(lines)]


@pytest.fixture(scope="module")
def byte_level():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[SPECIAL], show_progress=False)
    tok.train_from_iterator(corpus(0), trainer)
    return tok


@pytest.fixture(scope="module")
def metaspace():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", SPECIAL], show_progress=False)
    tok.train_from_iterator(corpus(1), trainer)
    return tok


@pytest.fixture(scope="module")
def byte_fallback():
    """Llama-2 style: SentencePiece BPE with <0xXX> byte tokens for characters it never saw."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    ascii_corpus = [line for line in corpus(2) if line.isascii()]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", SPECIAL], show_progress=False)
    tok.train_from_iterator(ascii_corpus, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def stream(tokenizer, ids, prompt_ids=None, skip_special_tokens=True):
    decoder = IncrementalDecoder(tokenizer, prompt_ids, skip_special_tokens)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert decoder.text == "".join(pieces)
    return pieces


def test_tokenizer_splits_characters_over_tokens(byte_level):
    """Sanity of the fixture: some tokens are partial UTF-8 characters on their own."""
    partial = [i for i in range(byte_level.get_vocab_size()) if "\ufffd" in byte_level.decode([i])]
    assert len(partial) > 50


@pytest.mark.parametrize("name", ["byte_level", "metaspace", "byte_fallback"])
@settings(max_examples=150, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_random_ids_stream_to_the_one_shot_decode(request, name, data, skip):
    tok = request.getfixturevalue(name)
    ids = data.draw(st.lists(st.integers(0, tok.get_vocab_size() - 1), max_size=40))
    pieces = stream(tok, ids, skip_special_tokens=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    if "\ufffd" not in full:
        assert "".join(pieces) == full
        assert not any("\ufffd" in p for p in pieces)
    elif name != "byte_fallback":
        # Byte-level decoding is lossy UTF-8 over all bytes, so even invalid bytes stream exactly.
        # ByteFallback instead turns a whole run of byte tokens into U+FFFDs once a stray byte
        # follows a completed character, which a stream that already showed the character
        # cannot take back (as in vLLM and TGI).
        assert "".join(pieces) == full


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=15), sep=st.sampled_from([" ", "", "\n"]))
def test_real_text_streams_without_replacement_chars(byte_level, metaspace, byte_fallback, words, sep):
    text = sep.join(words)
    for tok in (byte_level, metaspace, byte_fallback):
        ids = tok.encode(text).ids
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)
        assert pieces[-1] == ""  # nothing was left for flush


def test_multibyte_character_is_held_until_complete(byte_level):
    vocab = byte_level.get_vocab()
    ids = [vocab[bytes_to_unicode_symbol(b)] for b in "🙂".encode()]  # one token per byte
    decoder = IncrementalDecoder(byte_level)
    assert [decoder.push(i) for i in ids] == ["", "", "", "🙂"]


def bytes_to_unicode_symbol(b):
    """GPT-2's byte-to-printable-character map, for one byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        return chr(b)
    return chr(256 + [c for c in range(256) if c not in printable].index(b))


@settings(max_examples=60, deadline=None)
@given(prompt=st.lists(st.sampled_from(WORDS), min_size=1, max_size=8),
       gen=st.lists(st.sampled_from(WORDS), min_size=1, max_size=8))
def test_with_prompt_the_stream_continues_the_prompt_text(byte_level, metaspace, byte_fallback, prompt, gen):
    for tok in (byte_level, metaspace, byte_fallback):
        prompt_ids = tok.encode(" ".join(prompt)).ids
        gen_ids = tok.encode(" " + " ".join(gen)).ids
        pieces = stream(tok, gen_ids, prompt_ids)
        assert tok.decode(prompt_ids) + "".join(pieces) == tok.decode(prompt_ids + gen_ids)


def test_prompt_ending_inside_a_character_is_completed_by_the_stream(byte_level):
    vocab = byte_level.get_vocab()
    smile = [vocab[bytes_to_unicode_symbol(b)] for b in "🙂".encode()]
    prompt = byte_level.encode("hello").ids + smile[:2]
    pieces = stream(byte_level, smile[2:] + byte_level.encode(" world").ids, prompt)
    assert "".join(pieces) == "🙂 world"


def test_prompt_holding_invalid_bytes_is_not_repeated(byte_level):
    stray = byte_level.get_vocab()[bytes_to_unicode_symbol(0xFF)]  # never valid in UTF-8
    for tail in ("ab", "", "日本"):
        prompt = byte_level.encode("hello").ids + [stray] + byte_level.encode(tail).ids
        gen = byte_level.encode(" world 🙂").ids
        pieces = stream(byte_level, gen, prompt)
        assert byte_level.decode(prompt) + "".join(pieces) == byte_level.decode(prompt + gen)
        assert "".join(pieces) == " world 🙂"
    # a stray byte and then bytes that complete nothing: the prompt's U+FFFD is not repeated
    prompt = byte_level.encode("hello").ids + [stray]
    gen = [byte_level.get_vocab()[bytes_to_unicode_symbol(b)] for b in b"\x9f\x99"] + byte_level.encode("!").ids
    assert byte_level.decode(prompt) + "".join(stream(byte_level, gen, prompt)) == byte_level.decode(prompt + gen)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_prompt_and_stream_continue_the_prompt_text(byte_level, data):
    ids = st.lists(st.integers(0, byte_level.get_vocab_size() - 1), max_size=12)
    prompt, gen = data.draw(ids), data.draw(ids)
    text = "".join(stream(byte_level, gen, prompt))
    prompt_text, full = byte_level.decode(prompt), byte_level.decode(prompt + gen)
    if full.startswith(prompt_text):
        assert prompt_text + text == full
    else:  # the stream completed a character the prompt ended inside of: it owns its bytes
        cut = next(r for r in range(len(prompt) - 1, -1, -1) if full.startswith(byte_level.decode(prompt[:r])))
        assert len(prompt) - cut <= 3
        assert text == full[len(byte_level.decode(prompt[:cut])):]


def test_special_tokens_skipped_or_kept(byte_level):
    eos = byte_level.token_to_id(SPECIAL)
    ids = byte_level.encode("café").ids + [eos] + byte_level.encode(" 🙂").ids
    assert "".join(stream(byte_level, ids)) == "café 🙂"
    assert "".join(stream(byte_level, ids, skip_special_tokens=False)) == f"café{SPECIAL} 🙂"


# ---------------------------------------------------------------------------------------------
# stop strings


def match(stops, pieces):
    m = StopStringMatcher(stops)
    out = [m.push(p) for p in pieces]
    out.append(m.flush())
    assert m.text == "".join(out)
    return m, out


def test_stop_string_split_across_pieces():
    m, out = match(["STOP"], ["Hello S", "T", "OP and more", "ignored"])
    assert m.stopped and m.stop_string == "STOP"
    assert out == ["Hello ", "", "", "", ""]
    assert m.text == "Hello "


def test_false_start_of_a_stop_string_is_released():
    m, out = match(["STOP"], ["a ST", "OR", "Y S"])
    assert not m.stopped
    assert out == ["a ", "STOR", "Y ", "S"]


def test_stop_at_the_very_start():
    m, out = match(["<end>", "\n\n"], ["<e", "nd>rest"])
    assert m.stopped and m.stop_string == "<end>" and m.text == ""


def test_earliest_stop_string_wins_and_no_stops_passes_through():
    m, _ = match(["world", "lo w"], ["hello world"])
    assert m.stop_string == "lo w" and m.text == "hel"
    m, out = match([], ["a", "b"])
    assert out == ["a", "b", ""] and not m.stopped


def test_stop_strings_must_be_non_empty():
    with pytest.raises(ValueError, match="stop_strings: ''"):
        StopStringMatcher(["ok", ""])


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abSTOP🙂", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stops=st.lists(st.text(alphabet="abSTOP🙂", min_size=1, max_size=4), max_size=3))
@example(text="POO", cuts=[2], stops=["O", "POO"])  # "O" completes first, but "POO" starts earlier
@example(text="xPOa", cuts=[3], stops=["O", "POO"])  # ... and here "POO" never completes
def test_stop_matcher_equals_cutting_the_whole_text(text, cuts, stops):
    """However the text is split into pieces, the output is the text before the first stop."""
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    m, _ = match(stops, pieces)
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
    assert m.text == (text if first is None else text[:first])
    assert m.stopped == (first is not None)
