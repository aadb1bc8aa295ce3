"""What one generation request produces and how its tokens become output: `Completion` and
`StreamChunk`, `StopTracker` (one row's incremental text and when it stops: stop ids, stop strings,
length), and the defaults read from generation_config.json. Torch-free: both the PyTorch and the ONNX Runtime engine use it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..jsonfile import read_json
from .detokenize import StopStringMatcher, open_decoder
from .params import SamplingParams


@dataclass
class Completion:
    token_ids: list            # generated ids (a final stop id included, as transformers does)
    text: Optional[str]        # decoded text, stop strings and stop ids excluded (None without a tokenizer)
    logprobs: Optional[list]   # log p of each generated token under the raw model logits
    finish_reason: str         # "stop" (stop id or stop string) or "length"


@dataclass
class StreamChunk:
    token_id: int
    text: str                  # newly completed text ("" while it may still be part of a stop string)
    logprob: Optional[float]
    finish_reason: Optional[str]  # set on the last chunk


_GEN_CONFIG_FIELDS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p",
                      "repetition_penalty")


def defaults_from_generation_config(folder) -> dict:
    """SamplingParams defaults from generation_config.json (do_sample=false means greedy)."""
    gc = read_json(Path(folder) / "generation_config.json", required=False) or {}
    out = {k: gc[k] for k in _GEN_CONFIG_FIELDS if gc.get(k) is not None}
    if not gc.get("do_sample", False) and gc:
        out["temperature"] = 0.0
    eos = gc.get("eos_token_id")
    if eos is not None:
        out["stop_token_ids"] = tuple(eos) if isinstance(eos, list) else (eos,)
    return out


class StopTracker:
    """Per-row stop bookkeeping of one generated sequence: its incremental text and whether it ends
    (stop id, stop string, length)."""

    def __init__(self, params: SamplingParams, tokenizer, prompt_ids: Sequence[int]):
        self.params = params
        self.detok = open_decoder(tokenizer, prompt_ids=prompt_ids) if tokenizer is not None else None
        self.stops = StopStringMatcher(params.stop_strings) if params.stop_strings else None
        self.stop_ids = set(params.stop_token_ids)
        self.n = 0

    def add(self, token: int) -> tuple:
        """Record one generated token: (newly released text, finish reason or None)."""
        self.n += 1
        stop_id = token in self.stop_ids
        piece = self.detok.push(token) if self.detok is not None and not stop_id else ""
        if self.stops is not None:
            piece = self.stops.push(piece)
        reason = "stop" if stop_id or (self.stops is not None and self.stops.stopped) else None
        if reason is None and self.n >= self.params.max_new_tokens:
            reason = "length"
        if reason is not None:
            piece += self._final_text()
        return piece, reason

    def _final_text(self) -> str:
        """Text still held back when the row ends (partial characters, a possible stop-string start)."""
        if self.stops is not None and self.stops.stopped:
            return ""
        tail = self.detok.flush() if self.detok is not None else ""
        if self.stops is not None:
            tail = self.stops.push(tail)
            tail += "" if self.stops.stopped else self.stops.flush()
        return tail
