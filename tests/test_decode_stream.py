"""tokenizers' `DecodeStream` against our `IncrementalDecoder` and the one-shot decode: where the
library decodes alike (a plain Metaspace decoder) `open_decoder` uses it, elsewhere ours; these
tests pin both halves of that decision."""
import random

import pytest

from tokenizers.decoders import DecodeStream

from mmfuse.generation.detokenize import IncrementalDecoder, LibraryDecoder, library_decodes_alike, open_decoder
from test_detokenize import (SPECIAL, WORDS, byte_fallback, byte_level, bytes_to_unicode_symbol,  # noqa: F401
                             metaspace)


def _run(decoder, ids):
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert decoder.text == "".join(pieces)
    return "".join(pieces)


def _cases(tok, seed, n=200):
    """(prompt ids, generated ids): real text cut anywhere, random ids, special tokens mixed in."""
    rng = random.Random(seed)
    V, special = tok.get_vocab_size(), tok.token_to_id(SPECIAL)
    for _ in range(n):
        ids = tok.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))).ids
        if rng.random() < 0.3:
            ids = [rng.randrange(V) for _ in ids]
        if rng.random() < 0.2:
            ids.insert(rng.randrange(len(ids) + 1), special)
        cut = rng.randint(0, len(ids) - 1)
        yield ids[:cut], ids[cut:]


def test_metaspace_library_decoder_equals_ours(metaspace):
    assert library_decodes_alike(metaspace)
    for prompt, gen in _cases(metaspace, 0):
        ours = _run(IncrementalDecoder(metaspace, prompt), gen)
        assert _run(LibraryDecoder(metaspace, prompt), gen) == ours
        if not prompt:
            assert ours == metaspace.decode(gen)
    assert isinstance(open_decoder(metaspace), LibraryDecoder)


def test_byte_level_keeps_ours_decodestream_drops_trailing_bytes(byte_level):
    """A stream ending inside a character: the one-shot decode shows U+FFFD, DecodeStream (no flush)
    loses it; ours gives the one-shot text."""
    assert not library_decodes_alike(byte_level)
    assert isinstance(open_decoder(byte_level), IncrementalDecoder)
    partial = byte_level.encode("naïve ").ids + [byte_level.token_to_id(bytes_to_unicode_symbol(b)) for b in (0xE6, 0x97)]
    assert byte_level.decode(partial).endswith("\ufffd")  # the first two of the three bytes of 日
    stream = DecodeStream(skip_special_tokens=True)
    library = "".join(s for i in partial if (s := stream.step(byte_level, i)) is not None)
    assert library != byte_level.decode(partial)
    assert _run(IncrementalDecoder(byte_level), partial) == byte_level.decode(partial)


def test_byte_fallback_keeps_ours_decodestream_raises_on_invalid_bytes(byte_fallback):
    """A model can generate byte tokens that are not UTF-8: DecodeStream raises, ours decodes."""
    assert not library_decodes_alike(byte_fallback)
    bad = [byte_fallback.token_to_id(f"<0x{b:02X}>") for b in (0x79, 0x8B)]  # "y", then a stray continuation byte
    bad += [byte_fallback.token_to_id("t")]
    assert _run(IncrementalDecoder(byte_fallback), bad) == "y\ufffdt"  # (see test_detokenize on such runs)
    stream = DecodeStream(skip_special_tokens=True)
    with pytest.raises(Exception, match="Invalid prefix"):  # tokenizers raises a bare Exception
        for i in bad:
            stream.step(byte_fallback, i)
