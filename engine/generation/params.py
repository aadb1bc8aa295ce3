"""`SamplingParams`: how one request picks its tokens, its other libraries' names (ALIASES) and its
validation. Torch-free: the PyTorch and the ONNX Runtime engines share it."""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Optional

from ..errors import NumericalError, SamplingParamsError

GREEDY_TEMPERATURE = 1e-5  # temperatures below this decode greedily
# Beyond this range the penalty is absolute anyway (a seen token is never, or always, chosen),
# and a tiny one overflows float32 logits (logit / 1e-40 = inf).
REPETITION_PENALTY_RANGE = (0.01, 100.0)


# Other libraries' names for SamplingParams fields, each setting exactly one field: vLLM's
# max_tokens, min_tokens, stop, n; Hugging Face's num_return_sequences, eos_token_id, do_sample
# (do_sample=False is temperature 0). Giving an alias and its field with different values is an error.
ALIASES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens", "stop": "stop_strings",
           "num_return_sequences": "n", "eos_token_id": "stop_token_ids", "do_sample": "temperature"}


def resolve_aliases(kwargs: dict, base_temperature: float = 1.0) -> dict:
    """`kwargs` with every alias (ALIASES) replaced by its field. `base_temperature`: the
    temperature do_sample=True samples with when no temperature is given (a greedy base gives 1.0,
    HF's default)."""
    out = {k: v for k, v in kwargs.items() if k not in ALIASES}
    for alias, name in ALIASES.items():
        if alias not in kwargs:
            continue
        value = _alias_value(alias, kwargs[alias], out.get(name), base_temperature)
        if name in out and not _equal(out[name], value):
            raise SamplingParamsError(f"{alias}={kwargs[alias]!r} and {name}={out[name]!r} disagree "
                                      f"({alias} is another name for {name}): give one of them")
        out[name] = value
    return out


def _alias_value(alias: str, value, given, base_temperature: float):
    if alias in ("stop", "eos_token_id"):
        if value is None:
            return ()
        return (value,) if isinstance(value, (str, int)) else tuple(value)
    if alias == "do_sample":
        if not isinstance(value, bool):
            raise SamplingParamsError(f"do_sample={value!r}: must be a bool")
        if not value:
            return 0.0
        if given is not None:  # checked against the temperature given with it
            return given if given >= GREEDY_TEMPERATURE else 1.0
        return base_temperature if base_temperature >= GREEDY_TEMPERATURE else 1.0
    return value


def _equal(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


@dataclass(init=False)
class SamplingParams:
    """How to pick the tokens of one request. The defaults turn every filter off. Keyword
    arguments only; the names in ALIASES are accepted for their fields."""

    max_new_tokens: int = 64  # stop after this many generated tokens
    min_new_tokens: int = 0  # stop ids (and eos) are suppressed until this many tokens exist
    temperature: float = 1.0  # logits are divided by it; 0 (below 1e-5) means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (ties at the k-th kept); 0 = off
    top_p: float = 1.0  # keep the smallest most-likely set with mass >= top_p; 1.0 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0.0 = off
    repetition_penalty: float = 1.0  # HF: over prompt + generated tokens, positive logits / it,
    #                                  negative logits * it; 1.0 = off; in [0.01, 100]
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token generated so far
    frequency_penalty: float = 0.0  # OpenAI: minus this times the count of each generated token
    stop_token_ids: tuple[int, ...] = ()  # end on these ids; the caller merges the model's eos ids
    stop_strings: tuple[str, ...] = ()  # end when the text contains one (excluded from the output)
    seed: Optional[int] = None  # per-request seed: same seed, same tokens; None = nondeterministic
    logprobs: bool = False  # return log p(token) of each chosen token under the raw model logits
    n: int = 1  # completions per prompt (vLLM's n, HF's num_return_sequences); seeds seed, seed+1, ...

    def __init__(self, **kwargs):
        kwargs = resolve_aliases(kwargs)
        for f in fields(self):
            value = kwargs.pop(f.name, MISSING)
            if value is MISSING:
                value = f.default if f.default is not MISSING else f.default_factory()
            setattr(self, f.name, value)
        if kwargs:
            raise SamplingParamsError(f"unknown sampling option(s): {sorted(kwargs)} "
                                      f"(fields: {[f.name for f in fields(self)]}; aliases: {sorted(ALIASES)})")

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
            if f.name in ("max_new_tokens", "min_new_tokens", "top_k", "n"):
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
        if self.n < 1:
            raise bad("n", "must be >= 1")
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
        if not REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1]:
            lo, hi = REPETITION_PENALTY_RANGE
            raise bad("repetition_penalty", f"must be in [{lo}, {hi}] (1.0 means off)")
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


def check_rows(params, vocab_size: int, prompt_ids) -> None:
    """What every sampler checks before a request: one valid SamplingParams per prompt, stop ids and
    prompt ids inside the vocabulary."""
    if len(params) == 0:
        raise SamplingParamsError("Sampler needs at least one row of SamplingParams")
    if len(prompt_ids) != len(params):
        raise SamplingParamsError(f"Sampler: {len(params)} SamplingParams but {len(prompt_ids)} prompts")
    for p in params:
        p.validate()
        for t in p.stop_token_ids:
            if t >= vocab_size:
                raise SamplingParamsError(f"SamplingParams.stop_token_ids: id {t} >= vocab_size {vocab_size}")
    for row, ids in enumerate(prompt_ids):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise SamplingParamsError(f"prompt {row}: token id {bad[0]} outside [0, vocab_size={vocab_size})")


def non_finite_logits(step: int, rows: list) -> NumericalError:
    """The error every sampler raises when a row's processed logits hold NaN or +inf, or nothing
    finite to choose: argmax would pick garbage and the inverse CDF an id past the vocabulary."""
    return NumericalError(f"step {step}: the logits of row(s) {rows[:8]} are NaN or infinite (NaN/inf "
                          "weights, a degenerate config such as rope_theta 0, or an overflowing penalty)")
