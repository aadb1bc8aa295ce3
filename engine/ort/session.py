"""onnxruntime sessions with the options mmfuse exposes (threads, execution providers, graph
optimisation level), every option checked before a graph is loaded."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..errors import ProviderError
from ..huge_pages import collapse_new_memory

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def make_session(path: Optional[Path], threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                 optimization: str = "all", spinning: bool = True):
    """An InferenceSession for the graph at `path`; with path=None only the options are checked.

    `spinning`: onnxruntime's intra-op threads busy-wait between the operators of a run (its own
    default, and onnxruntime-genai's): on a dedicated CPU that is the faster setting. mmfuse also
    stops the spinning when a run returns (`session.force_spinning_stop`), so the threads do not
    burn the cores between decode steps or after a generation. On a CPU shared with other work
    (or with more threads than free cores) pass False: spinning threads then take the cores the
    computing ones need (bench/README.md, "ONNX decoders", has both measured)."""
    import onnxruntime as ort

    providers = list(providers) if providers else ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    for p in providers:
        if p not in available:
            raise ProviderError(f"execution provider {p!r} is not available in this onnxruntime "
                                f"(available: {', '.join(available)})")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ProviderError(f"threads={threads!r}: expected a positive integer or None")
    if optimization not in OPTIMIZATION_LEVELS:
        raise ProviderError(f"graph optimisation level {optimization!r}: expected one of {OPTIMIZATION_LEVELS}")
    if path is None:
        return None
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: not the load-time notes on graphs onnxruntime runs fine
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if threads is not None:
        so.intra_op_num_threads = threads
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    with collapse_new_memory():  # the weights onnxruntime copies while it loads, into huge pages
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
