"""Running an exported decoder graph over a batch with its KV cache, through onnxruntime's IO binding.

Rows are right-padded for the prefill call; each row then continues at its own position, exactly as
the PyTorch `DecodeState` does, so a row gets what it would get alone.

portable   past_key_values.* are bound to the previous call's present.* OrtValues (no copy through
           numpy); the new column of attention_mask is 0 for padding gaps and finished rows.
optimised  one (B, H_kv, max_len, D) OrtValue per layer and K/V, allocated once and bound once (one
           IOBinding kept for the batch) as both past and present (GroupQueryAttention writes the new
           positions in place); a step rebinds only its three small inputs. The (B, 1, V) logits of
           decode steps and of the prefill are a preallocated OrtValue too, so decoding allocates no
           cache or logits memory. attention_mask only carries each row's filled length (row sums).

The prefill asks for logits at each row's last prompt position only (graph input logit_positions),
so the LM head runs on B rows instead of B x S.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnxruntime as ort

from ..errors import CapacityError

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
GRAPH_FILE = "model.onnx"  # the decoder graph in the layout optimum and onnxruntime-genai use
# The same graph with logit_positions a required input (onnxruntime's IO binding cannot bind an
# overridable initializer): mmfuse's runtime runs it to get last-position logits at prefill. It
# reads the weights from model.onnx.data, so it costs only the graph's bytes.
RUNTIME_GRAPH = "model_last_logits.onnx"


class DecoderSession:
    """One decoder graph and the KV cache of the batch it is running (one batch at a time: callers
    that run batches concurrently give each its own DecoderSession over the same InferenceSession,
    whose runs are thread-safe)."""

    def __init__(self, session: ort.InferenceSession, manifest: dict):
        self.session = session
        cfg = manifest["config"]
        self.n_layer, self.n_kv_head, self.head_dim = cfg["n_layer"], cfg["n_kv_head"], cfg["head_dim"]
        self.vocab_size, self.context, self.d_model = cfg["vocab_size"], cfg["max_seq_len"], cfg["d_model"]
        self.dtype = NP_DTYPES[manifest["dtype"]]
        self.shared = manifest["variant"] == "optimized"
        self.inputs_embeds = bool(manifest.get("inputs_embeds"))
        self._x_name = "inputs_embeds" if self.inputs_embeds else "input_ids"
        # RUNTIME_GRAPH takes logit_positions; GRAPH_FILE (and exports before it) gives every position
        self.logit_positions = "logit_positions" in {i.name for i in session.get_inputs()}
        self.batch = 0
        self.max_len = 0

    # -- cache -----------------------------------------------------------------------------

    def allocate(self, batch: int, max_len: int) -> None:
        """A cache for `batch` rows of up to `max_len` positions each (kept when it already fits)."""
        if max_len > self.context:
            raise CapacityError(f"a cache of {max_len} positions exceed the model's context of {self.context} positions")
        if self.shared and (batch != self.batch or max_len > self.max_len):
            shape = (batch, self.n_kv_head, max_len, self.head_dim)
            self._kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype)) for _ in range(2 * self.n_layer)]
            self._logits1_np = np.zeros((batch, 1, self.vocab_size), self.dtype)  # (B, 1, V), written by each step
            self._logits1 = ort.OrtValue.ortvalue_from_numpy(self._logits1_np)
            self._tok = np.zeros((batch, 1), np.int64)  # decode inputs, refilled in place
            self._pos = np.zeros((batch, 1), np.int64)
            self._first = np.zeros((batch, 1), np.int64)  # logit_positions of a one-token call
            self._ones = np.ones(batch * max_len, np.int64)  # attention_mask of rows all as long as the longest
            # one binding for the whole batch: the KV buffers stay bound as past and present, each
            # call rebinds only its inputs and the logits
            self._io = self.session.io_binding()
            # _tok, _pos and _first as OrtValues over their numpy buffers: bound once for the decode
            # steps (rebound after a prefill), then only refilled
            self._step_values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in
                                 (("input_ids", self._tok), ("position_ids", self._pos), ("logit_positions", self._first))
                                 if name != "logit_positions" or self.logit_positions}
            self._step_bound = False
            for (past, present), buf in zip(self._kv_names(), self._kv):
                self._io.bind_ortvalue_input(past, buf)
                self._io.bind_ortvalue_output(present, buf)
            self.max_len = max_len
        elif not self.shared:
            self.max_len = max_len
        self.batch = batch
        self.lengths = np.zeros(batch, np.int64)  # (B,) filled positions per row
        if not self.shared:
            empty = np.zeros((batch, self.n_kv_head, 0, self.head_dim), self.dtype)
            self._past = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in range(2 * self.n_layer)]
            self._mask = np.zeros((batch, 0), np.int64)  # (B, T) which cache columns hold a row's tokens

    def _check_room(self, extra: Sequence[int]) -> None:
        if (self.lengths + np.asarray(extra) <= self.max_len).all():
            return
        for b, (n, k) in enumerate(zip(self.lengths.tolist(), extra)):
            if n + k > self.max_len:
                raise CapacityError(f"row {b}: {n} cached + {k} new positions exceed the KV cache of "
                                    f"{self.max_len} positions")

    # -- calls -----------------------------------------------------------------------------

    def _kv_names(self):
        for i in range(self.n_layer):
            for kv in ("key", "value"):
                yield f"past_key_values.{i}.{kv}", f"present.{i}.{kv}"

    def _run(self, x: np.ndarray, mask: np.ndarray, pos: np.ndarray, rows=None, step: bool = False) -> np.ndarray:
        """One graph call; x is input_ids (B, S) or inputs_embeds (B, S, C). Logits (B, K, V) at the
        positions `rows` (B, K) (None: every position; K = S). `step`: x, pos and rows are the
        optimised variant's _tok, _pos and _first, bound once for consecutive steps."""
        io = self._io if self.shared else self.session.io_binding()
        io.bind_cpu_input("attention_mask", mask)
        if step:
            if not self._step_bound:
                for name, value in self._step_values.items():
                    io.bind_ortvalue_input(name, value)
                self._step_bound = True
        else:
            if self.shared:
                self._step_bound = False
            io.bind_cpu_input(self._x_name, x)
            io.bind_cpu_input("position_ids", pos)
            if self.logit_positions:  # a required input of RUNTIME_GRAPH
                if rows is None:
                    rows = np.broadcast_to(np.arange(pos.shape[1], dtype=np.int64), pos.shape)
                io.bind_cpu_input("logit_positions", np.ascontiguousarray(rows))
        if self.shared:  # logits into an OrtValue of ours: the preallocated (B, 1, V) one when it fits
            K = pos.shape[1] if rows is None else rows.shape[1]
            out = self._logits1 if K == 1 else ort.OrtValue.ortvalue_from_shape_and_type(
                (self.batch, K, self.vocab_size), self.dtype)
            io.bind_ortvalue_output("logits", out)
        else:
            io.bind_output("logits", "cpu")
            for (past, present), buf in zip(self._kv_names(), self._past):
                io.bind_ortvalue_input(past, buf)
                io.bind_output(present, "cpu")
        self.session.run_with_iobinding(io)
        if self.shared:
            return self._logits1_np.copy() if K == 1 else out.numpy()  # the (B, 1, V) buffer is reused by the next call
        outs = io.get_outputs()
        self._past = outs[1:]
        return outs[0].numpy()

    def prefill(self, prompts: Sequence, all_logits: bool = False) -> np.ndarray:
        """Run each row's prompt from position 0 (token ids, or (L, C) embeddings with
        inputs_embeds); logits (B, V) at each row's last prompt position (all: (B, S, V))."""
        if len(prompts) != self.batch:
            raise ValueError(f"prefill got {len(prompts)} prompts for a batch of {self.batch}")
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            raise ValueError(f"prompt {lens.index(min(lens))} is empty")
        self.lengths[:] = 0
        self._check_room(lens)
        S = max(lens)
        if self.inputs_embeds:
            x = np.zeros((self.batch, S, prompts[0].shape[-1]), self.dtype)
        else:
            x = np.zeros((self.batch, S), np.int64)
        mask = np.zeros((self.batch, S), np.int64)
        for b, p in enumerate(prompts):
            x[b, : lens[b]] = p
            mask[b, : lens[b]] = 1
        pos = np.broadcast_to(np.arange(S, dtype=np.int64), (self.batch, S)).copy()
        if not self.shared:
            self.allocate(self.batch, self.max_len)  # fresh, empty past
        last = np.asarray(lens, np.int64) - 1
        rows = last[:, None] if self.logit_positions and not all_logits else None
        logits = self._run(x, mask, pos, rows)
        if not self.shared:
            self._mask = mask
        self.lengths[:] = lens
        if all_logits:
            return logits
        return logits[:, 0] if rows is not None else logits[np.arange(self.batch), last]

    def extend(self, tokens: np.ndarray, active=None) -> np.ndarray:
        """Append tokens (B, k) (or embeddings (B, k, C)) after each row's cached positions; rows
        where `active` is False do not advance. Logits (B, k, V)."""
        B, k = tokens.shape[:2]
        if self.shared and k != 1:
            raise ValueError("the optimised graph continues one token per call (GroupQueryAttention on CPU)")
        if self.shared and not self.inputs_embeds:
            return self._step(tokens.reshape(B), active)[:, None]
        active = None if active is None else np.asarray(active, bool)
        self._check_room([k] * B)
        pos = self.lengths[:, None] + np.arange(k, dtype=np.int64)  # (B, k)
        if self.shared:  # one embedding per row
            self._pos[:] = pos
            logits = self._run(tokens, self._step_mask(self.lengths.tolist()), self._pos,
                               self._first if self.logit_positions else None)
        else:
            fills = np.ones(B, bool) if active is None else active
            self._mask = np.concatenate([self._mask, np.repeat(fills[:, None], k, 1).astype(np.int64)], axis=1)
            logits = self._run(np.ascontiguousarray(tokens), self._mask, pos)
        self.lengths += k if active is None else k * active
        return logits

    def _step_mask(self, lens: list) -> np.ndarray:
        """attention_mask (B, W) of a one-token call on the optimised graph, rows with `lens` filled
        positions: only its row sums (lens + 1) and width (their largest) matter."""
        B, W = len(lens), max(lens) + 1
        if min(lens) + 1 == W:  # every row as long: a view of ones, nothing to build
            return self._ones[:B * W].reshape(B, W)
        return (np.arange(W)[None, :] <= np.asarray(lens)[:, None]).astype(np.int64)

    def decode(self, tokens: np.ndarray, active=None) -> np.ndarray:
        """One token per row (B,) -> logits (B, V)."""
        if self.shared and not self.inputs_embeds:
            return self._step(tokens, active)
        return self.extend(np.asarray(tokens, np.int64).reshape(-1, 1), active)[:, 0]

    def _step(self, tokens, active) -> np.ndarray:
        """One token id per row on the optimised graph (decode, and extend by one token), in Python ints
        and the bound buffers: once a step has streamed the weights through the caches, each small
        numpy operation costs tens of microseconds (bench/README.md, "ONNX decoders")."""
        toks = tokens.ravel().tolist() if isinstance(tokens, np.ndarray) else [int(t) for t in tokens]
        B = self.batch
        if len(toks) != B:
            raise ValueError(f"decode got {len(toks)} tokens for a batch of {B}")
        lens = self.lengths.tolist()
        W = max(lens) + 1
        if W > self.max_len:
            self._check_room([1] * B)
        for b in range(B):
            self._tok[b, 0] = toks[b]
            self._pos[b, 0] = lens[b]
        logits = self._run(self._tok, self._step_mask(lens), self._pos, self._first if self.logit_positions else None,
                           step=True)
        for b in range(B):
            if active is None or active[b]:
                self.lengths[b] = lens[b] + 1
        return logits[:, 0]
