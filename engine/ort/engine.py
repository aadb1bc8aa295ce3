"""`OrtEngine`: generation on an mmfuse ONNX decoder export with onnxruntime, without torch.

The request side (sampling parameters, stop ids and strings, incremental text, capacity checks,
`generate` / `stream` and their output objects) is `GenerationFrontend`, the same code as the
PyTorch `Engine`; sampling is `NumpySampler`, the numpy twin of its torch sampler; the graph runs
through `DecoderSession` (IO binding, KV cache reused step to step).

Thread-safe without a lock around generation: each call (and each open stream) runs its batch in a
`DecoderSession` of its own over the one shared InferenceSession (onnxruntime's runs are
thread-safe), so concurrent calls never share a KV cache or IO binding. The engine keeps one idle
DecoderSession, with its buffers, for the next call.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..generation.frontend import Generation, GenerationFrontend
from ..generation.requests import defaults_from_generation_config
from ..generation.sampling_np import NumpySampler
from ..tokenizer import load_tokenizer
from .decoder_session import GRAPH_FILE, RUNTIME_GRAPH, DecoderSession
from .manifest import read_manifest
from .session import make_session



@dataclass
class OrtModelConfig:
    """What the front end needs to know about an exported decoder (from mmfuse_export.json)."""

    vocab_size: int
    max_seq_len: int  # the model's context
    eos_token_ids: tuple = field(default_factory=tuple)


class OrtEngine(GenerationFrontend):
    """An exported decoder with its tokenizer and generation defaults: `generate()` and `stream()`."""

    def __init__(self, session: DecoderSession, config: OrtModelConfig, tokenizer=None, defaults: Optional[dict] = None,
                 manifest: Optional[dict] = None):
        self.session = session  # the idle DecoderSession (None while every one is in use)
        self._graph = session.session  # the InferenceSession all of them run
        self._idle_lock = threading.Lock()
        self.cfg = config
        self.tokenizer = tokenizer
        self.defaults = dict(defaults or {})
        self.manifest = manifest or {}

    @classmethod
    def from_pretrained(cls, onnx_dir, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                        graph_optimization_level: str = "all", spinning: bool = True) -> "OrtEngine":
        """Open an export folder of `mmfuse export onnx`; options are checked before anything is read
        (`spinning`: see `session.make_session`)."""
        make_session(None, threads, providers, graph_optimization_level)  # options only: errors before any reading
        folder = Path(onnx_dir)
        manifest = read_manifest(folder, "decoder")
        if manifest.get("inputs_embeds"):
            from ..errors import ExportFolderError

            raise ExportFolderError(f"{folder}: an inputs_embeds export (a vision-language decoder) takes embeddings, "
                                    "not token ids; OrtEngine generates from token ids")
        c = manifest["config"]
        config = OrtModelConfig(c["vocab_size"], c["max_seq_len"], tuple(c["eos_token_ids"]))
        graph = RUNTIME_GRAPH if RUNTIME_GRAPH in manifest.get("files", {}) else GRAPH_FILE
        sess = make_session(folder / graph, threads, providers, graph_optimization_level, spinning)
        tok = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
        return cls(DecoderSession(sess, manifest), config, tok, defaults_from_generation_config(folder), manifest)

    def _take_session(self) -> DecoderSession:
        with self._idle_lock:
            s, self.session = self.session, None
        return s if s is not None else DecoderSession(self._graph, self.manifest)

    def _give_back(self, s: DecoderSession) -> None:
        with self._idle_lock:
            self.session = s

    def _start(self, prompts: list, params: list) -> Generation:
        s = self._take_session()
        try:
            s.allocate(len(prompts), max(len(ids) + p.max_new_tokens for ids, p in zip(prompts, params)))
            sampler = NumpySampler(params, self.cfg.vocab_size, prompts)
            logits = s.prefill(prompts)
        except BaseException:
            self._give_back(s)
            raise
        return Generation(sampler, logits, s.decode, close=lambda: self._give_back(s))
