"""The one GPU call: every CUDA correctness check and timing table of the project, in one run.

    PYTHONUNBUFFERED=1 python bench/gpu_check.py [--quick]

Runs, each guarded so one failure does not hide the rest:
1. bench/gpu_attention.py   Triton prefill/decode kernels vs SDPA flash/cuDNN/efficient (+ end to end)
2. bench/gpu_contrastive.py fused CLIP/SigLIP losses vs the materialised PyTorch loss
3. bench/bench_decode.py    decoder tokens/s vs transformers generate, bf16, batch 1, CUDA graphs

Works from a source checkout without `pip install` (the GPU machine has its own torch): when
`mmfuse` is not importable, engine/ and kernels/ are mapped onto `mmfuse` / `mmfuse.kernels`
(the n-gram C++ extension is not needed here).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def ensure_mmfuse() -> None:
    """Import mmfuse from engine/ and kernels/ when it is not installed."""
    if importlib.util.find_spec("mmfuse") is not None:
        return
    for name, folder in (("mmfuse", "engine"), ("mmfuse.kernels", "kernels")):
        path = os.path.join(ROOT, folder)
        spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                      submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes in every section")
    args = ap.parse_args(argv)
    ensure_mmfuse()
    import torch

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    quick = ["--quick"] if args.quick else []
    sections = [
        ("attention kernels", "gpu_attention", quick),
        ("contrastive losses", "gpu_contrastive", quick),
        ("decoder end to end", "bench_decode", ["--device", "cuda", "--dtype", "bf16", "--batch", "1",
                                                "--models", "gpt2-124m", "llama-1.1b", "--cuda-graph",
                                                "--repeats", "3"]),
    ]
    failed = []
    for title, module, sargs in sections:
        print(f"\n===== {title} =====", flush=True)
        try:
            rc = importlib.import_module(module).main(sargs)
            if rc:
                failed.append(title)
        except Exception:
            traceback.print_exc()
            failed.append(title)
    print("\nFAILED: " + ", ".join(failed) if failed else "\nall sections ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
