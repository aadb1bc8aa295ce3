"""onnxruntime sessions with the options mmfuse exposes (threads, execution providers, graph
optimisation level), validated before any model is read."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import onnxruntime as ort

from ..errors import ProviderError

OPT_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def check_providers(providers: Optional[Sequence[str]]) -> list:
    """The execution providers to use (default CPU); an unknown or unavailable one is an error."""
    providers = ["CPUExecutionProvider"] if providers is None else list(providers)
    if not providers:
        raise ProviderError("providers: empty list (give at least one, e.g. CPUExecutionProvider)")
    known = set(ort.get_all_providers())
    here = set(ort.get_available_providers())
    for p in providers:
        if not isinstance(p, str) or p not in known:
            raise ProviderError(f"providers: unknown execution provider {p!r} (known: {sorted(known)})")
        if p not in here:
            raise ProviderError(f"providers: {p!r} is not available in this onnxruntime build "
                                f"(available: {sorted(here)})")
    return providers


def session_options(threads: Optional[int] = None, graph_optimization_level: str = "all") -> ort.SessionOptions:
    if graph_optimization_level not in OPT_LEVELS:
        raise ProviderError(f"graph_optimization_level={graph_optimization_level!r}: expected one of {sorted(OPT_LEVELS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ProviderError(f"threads={threads!r}: expected an int >= 0 (0 = onnxruntime's default)")
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[graph_optimization_level]
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    return so


def open_session(path: Path, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                 graph_optimization_level: str = "all") -> ort.InferenceSession:
    """An InferenceSession of one graph (weights in its external data file beside it)."""
    so = session_options(threads, graph_optimization_level)
    return ort.InferenceSession(str(path), sess_options=so, providers=check_providers(providers))
