"""Streaming text: incremental detokenization and stop-string matching.

`IncrementalDecoder` turns a stream of token ids into text pieces whose concatenation equals
decoding all ids at once. It uses the prefix/read-offset technique of vLLM and TGI: decode a
short window of recent ids twice, without and with the new tokens, and emit the difference once
the window no longer ends in an incomplete UTF-8 character ("\\ufffd"). Decoding a window rather
than each token alone keeps decoders that look at neighbouring tokens (SentencePiece's leading
space, byte fallback, byte-level BPE splitting a character over tokens) right.

`open_decoder` picks the implementation: tokenizers' own `decoders.DecodeStream` (Rust) for
tokenizers whose decoder is plain Metaspace (SentencePiece without byte fallback), where it gives
the same text as this one on every sequence tested (tests/test_decode_stream.py); ours for
byte-level BPE and byte fallback, where DecodeStream drops trailing incomplete bytes (it has no
flush) and raises on invalid byte-fallback sequences a model can generate.

`StopStringMatcher` sits after it: it holds back text that could be the start of a stop string
and cuts the stream just before the first stop string that appears (the stop string itself is
not part of the output, as in OpenAI and vLLM).
"""
from __future__ import annotations

from typing import Optional, Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream, Metaspace

INCOMPLETE = "\ufffd"  # what a decoder yields for bytes that do not (yet) form a character
PROMPT_CONTEXT = 5  # prompt tokens decoded in front of the first generated ones (as vLLM)
MAX_CONTEXT_SEARCH = 8  # further prompt tokens tried to start that context on a character boundary


class IncrementalDecoder:
    """Decodes token ids one at a time: `push(id)` returns only the newly completed text."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Optional[Sequence[int]] = None, skip_special_tokens: bool = True
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids or ())  # prompt + generated ids
        self.read_offset = len(self.ids)  # ids before it are already text
        self.prefix_offset = self._window_start(self.read_offset)  # start of the decoded window
        # A prompt whose text ends in U+FFFD holds invalid bytes or ends inside a character that
        # the stream may complete: settled by the first text (see `_settle_prompt_end`).
        self._unsettled = self._decode(self.prefix_offset, self.read_offset).endswith(INCOMPLETE)
        self._pieces: list[str] = []

    def _window_start(self, read: int) -> int:
        """A window start near `read - PROMPT_CONTEXT`, preferably on a character boundary (a
        byte-fallback decoder turns a whole run of bytes into U+FFFDs when it starts inside a
        character), i.e. one whose text up to `read` holds no U+FFFD."""
        start = max(read - PROMPT_CONTEXT, 0)
        for prefix in range(start, max(start - MAX_CONTEXT_SEARCH, 0) - 1, -1):
            if INCOMPLETE not in self._decode(prefix, read):
                return prefix
        return start

    def _settle_prompt_end(self) -> None:
        """Move the read offset back over the prompt's last (at most 3) tokens until the prompt
        text is a prefix of the text with the stream: the bytes of a character the stream
        completes then belong to the stream, and invalid prompt bytes are not repeated."""
        n = self.read_offset
        for read in range(n, max(n - 3, 0) - 1, -1):
            prefix = self._window_start(read)
            if self._decode(prefix).startswith(self._decode(prefix, read)):
                self.prefix_offset, self.read_offset = prefix, read
                break
        self._unsettled = False

    def _decode(self, start: int, stop: Optional[int] = None) -> str:
        return self.tokenizer.decode(self.ids[start:stop], skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> str:
        if self._unsettled:
            if self._decode(self.prefix_offset).endswith(INCOMPLETE) and not final:
                return ""
            self._settle_prompt_end()
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(INCOMPLETE) and not final):
            return ""
        piece = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._pieces.append(piece)
        return piece

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is partial)."""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of generation: the held-back text, incomplete characters included (as the
        one-shot decode shows them)."""
        return self._advance(final=True)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)


class LibraryDecoder:
    """`IncrementalDecoder`'s interface over tokenizers' `DecodeStream`."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Optional[Sequence[int]] = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for i in list(prompt_ids or ())[-PROMPT_CONTEXT:]:  # context for the first piece's leading space
            self.stream.step(tokenizer, int(i))
        self._pieces: list[str] = []

    def push(self, token_id: int) -> str:
        piece = self.stream.step(self.tokenizer, int(token_id)) or ""
        if piece:
            self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        return ""  # a Metaspace decoder never holds text back

    @property
    def text(self) -> str:
        return "".join(self._pieces)


def library_decodes_alike(tokenizer: Tokenizer) -> bool:
    """True where DecodeStream gives the same text as IncrementalDecoder: a plain Metaspace decoder."""
    return isinstance(tokenizer.decoder, Metaspace)


def open_decoder(tokenizer: Tokenizer, prompt_ids: Optional[Sequence[int]] = None, skip_special_tokens: bool = True):
    """The incremental decoder for `tokenizer`: the library's where it decodes alike, else ours."""
    cls = LibraryDecoder if library_decodes_alike(tokenizer) else IncrementalDecoder
    return cls(tokenizer, prompt_ids, skip_special_tokens)


class StopStringMatcher:
    """Finds stop strings in streamed text. `push(piece)` returns the text that is safe to show:
    everything except a tail that could still grow into a stop string, and nothing from a stop
    string on. After a stop string was seen, `stopped` is True and `stop_string` names it."""

    def __init__(self, stop_strings: Sequence[str]):
        bad = [s for s in stop_strings if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"stop_strings: {bad[0]!r} is not a non-empty string")
        self.stop_strings = tuple(stop_strings)
        self.stopped = False
        self.stop_string: Optional[str] = None
        self._held = ""  # released text ends before this; it may be the start of a stop string
        self._longest = max((len(x) for x in self.stop_strings), default=0)
        self._pieces: list[str] = []

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._held + piece
        hit = self._first_hit(text)
        pending = self._pending_start(text, hit[0] if hit else len(text))
        if pending is not None:  # a stop string may still complete there: decide later
            self._held = text[pending:]
            return self._release(text[:pending])
        self._held = ""
        if hit:
            return self._stop(text, hit)
        return self._release(text)

    def _first_hit(self, text: str):
        """(index, stop string) of the earliest complete stop string in `text`, or None."""
        hits = [(i, s) for s in self.stop_strings if (i := text.find(s)) >= 0]
        return min(hits, key=lambda hit: hit[0]) if hits else None

    def _pending_start(self, text: str, limit: int) -> Optional[int]:
        """The earliest p < limit where text[p:] is a proper start of a stop string: text from p
        on may still become a stop string that begins before the first complete one."""
        for p in range(max(0, len(text) - self._longest + 1), min(limit, len(text))):
            tail = text[p:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stop_strings):
                return p
        return None

    def _stop(self, text: str, hit) -> str:
        cut, self.stop_string = hit
        self.stopped = True
        return self._release(text[:cut])

    def flush(self) -> str:
        """At the end of generation: the held-back text, cut at a stop string it holds."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        hit = self._first_hit(held)
        return self._stop(held, hit) if hit else self._release(held)

    def _release(self, text: str) -> str:
        if text:
            self._pieces.append(text)
        return text

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._pieces)
