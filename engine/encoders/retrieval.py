"""Top-k retrieval by inner product over an embedding index too large to score at once.

The index (N, E) may be a torch tensor, a numpy array or a numpy memmap on disk; it is read in
chunks of `chunk_size` rows, each chunk's top-k is merged into the running top-k, so memory is
O(Q * (chunk_size + k)) whatever N is. With L2-normalised embeddings the score is cosine similarity.
"""
from __future__ import annotations

import numpy as np
import torch


def search_reference(queries: torch.Tensor, index: torch.Tensor, k: int):
    """Plain scoring of the whole index at once (for tests)."""
    return (queries.float() @ torch.as_tensor(np.asarray(index)).float().T).topk(k, dim=-1)


def search(queries, index, k: int = 10, chunk_size: int = 65536):
    """-> (scores (Q, k), indices (Q, k) int64) of the k best index rows per query, best first."""
    q = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries)
    if q.dim() == 1:
        q = q[None]
    if q.dim() != 2:
        raise ValueError(f"queries of shape {tuple(q.shape)}, expected (Q, E)")
    if len(index.shape) != 2:
        raise ValueError(f"index of shape {tuple(index.shape)}, expected (N, E)")
    N, E = index.shape
    if q.shape[1] != E:
        raise ValueError(f"queries have dimension {q.shape[1]} but the index has dimension {E}")
    if not 1 <= k <= N:
        raise ValueError(f"k={k} must be between 1 and the index size {N}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    q = q.float()
    best_s = torch.full((q.shape[0], 0), float("-inf"))
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
    for start in range(0, N, chunk_size):
        chunk = index[start:start + chunk_size]
        chunk = torch.from_numpy(np.array(chunk, dtype=np.float32)) if not isinstance(chunk, torch.Tensor) else chunk
        s = q.to(chunk.device) @ chunk.float().T  # (Q, n)
        kk = min(k, s.shape[1])
        cs, ci = s.topk(kk, dim=-1)
        best_s = torch.cat([best_s, cs.cpu()], dim=1)
        best_i = torch.cat([best_i, ci.cpu() + start], dim=1)
        best_s, order = best_s.topk(min(k, best_s.shape[1]), dim=-1)
        best_i = best_i.gather(1, order)
    return best_s, best_i
