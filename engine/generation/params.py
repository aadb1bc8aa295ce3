"""`SamplingParams`: how one request picks its tokens, and its validation. Torch-free: the PyTorch
and the ONNX Runtime engines share it."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

from ..errors import MMFuseError

GREEDY_TEMPERATURE = 1e-5  # temperatures below this decode greedily


class SamplingParamsError(MMFuseError, ValueError):
    """A sampling parameter is out of range or of the wrong type."""


@dataclass
class SamplingParams:
    """How to pick the tokens of one request. The defaults turn every filter off."""

    max_new_tokens: int = 64  # stop after this many generated tokens
    min_new_tokens: int = 0  # stop ids (and eos) are suppressed until this many tokens exist
    temperature: float = 1.0  # logits are divided by it; 0 (below 1e-5) means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (ties at the k-th kept); 0 = off
    top_p: float = 1.0  # keep the smallest most-likely set with mass >= top_p; 1.0 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0.0 = off
    repetition_penalty: float = 1.0  # HF: over prompt + generated tokens, positive logits / it,
    #                                  negative logits * it; 1.0 = off
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token generated so far
    frequency_penalty: float = 0.0  # OpenAI: minus this times the count of each generated token
    stop_token_ids: tuple[int, ...] = ()  # end on these ids; the caller merges the model's eos ids
    stop_strings: tuple[str, ...] = ()  # end when the text contains one (excluded from the output)
    seed: Optional[int] = None  # per-request seed: same seed, same tokens; None = nondeterministic
    logprobs: bool = False  # return log p(token) of each chosen token under the raw model logits

    @property
    def greedy(self) -> bool:
        """Argmax decoding; a temperature below GREEDY_TEMPERATURE counts as 0 (as in vLLM),
        since dividing by it would overflow float32 logits."""
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self) -> "SamplingParams":
        """Raise SamplingParamsError naming the first bad field and its value; return self."""

        def bad(name: str, why: str) -> SamplingParamsError:
            return SamplingParamsError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("max_new_tokens", "min_new_tokens", "top_k"):
                if not _is_int(value):
                    raise bad(f.name, "must be an int")
            elif f.name in ("stop_token_ids", "stop_strings"):
                if not isinstance(value, (tuple, list)):
                    raise bad(f.name, "must be a tuple")
            elif f.name == "seed":
                if value is not None and not (_is_int(value) and 0 <= value < 2**64):
                    raise bad(f.name, "must be None or an int in [0, 2**64)")
            elif f.name == "logprobs":
                if not isinstance(value, bool):
                    raise bad(f.name, "must be a bool")
            elif not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                raise bad(f.name, "must be a finite number")
        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", f"must be in [0, max_new_tokens={self.max_new_tokens}]")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0 (0 means off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1.0 means off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2] (OpenAI range)")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must hold non-negative ints")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise bad("stop_strings", "must hold non-empty strings")
        return self


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
