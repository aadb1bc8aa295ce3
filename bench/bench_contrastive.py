"""Contrastive loss fwd+bwd: time and peak memory of mmfuse's losses vs the materialised PyTorch loss.

    python bench/bench_contrastive.py                    # CPU table (N = 4096, 16384; D = 512)
    python bench/bench_contrastive.py --sizes 4096 --reps 3

CPU: fp32 features, mmfuse's chunked torch backend (what CPU tensors use) against the
OpenCLIP-style reference (`clip_loss_reference` / `siglip_loss_reference`, logits materialised),
in the same run. Time: median of --reps fwd+bwd calls after one warm-up. Peak memory: each
(loss, implementation, N) runs once in a fresh subprocess, which resets the kernel's high-water
mark (/proc/self/clear_refs = 5) after a small warm-up and building its inputs, and reports VmHWM minus VmRSS before
the call, i.e. the resident memory the fwd+bwd added (inputs excluded). Linux only.
On CUDA the same script also prints the GPU table (`gpu_table`, also run by bench/gpu_contrastive.py):
bf16 features, the Triton backend, median of --reps after a warm-up (which autotunes); peak =
torch.cuda.max_memory_allocated during the call, inputs included; the PyTorch loss reports OOM
where it does not fit.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import torch
import torch.nn.functional as F
from common import median_seconds

from mmfuse.kernels import clip_loss, clip_loss_reference, siglip_loss, siglip_loss_reference

LOSSES = {  # kind -> (mmfuse loss, materialised reference, extra scalar arguments)
    "clip": (clip_loss, clip_loss_reference, (14.3,)),
    "siglip": (siglip_loss, siglip_loss_reference, (10.0, -10.0)),
}


def make_inputs(kind: str, N: int, D: int, dtype, device, seed: int = 0):
    """Normalised (N, D) image/text features with gradients, plus scale (and bias) leaves."""
    g = torch.Generator(device=device).manual_seed(seed)
    img = F.normalize(torch.randn(N, D, generator=g, device=device), dim=-1)
    txt = F.normalize(img + torch.randn(N, D, generator=g, device=device), dim=-1)
    scalars = [torch.tensor(v, device=device) for v in LOSSES[kind][2]]
    return [t.to(dtype) if i < 2 else t for i, t in enumerate([img, txt] + scalars)]


def fwd_bwd(fn, inputs, **kw) -> None:
    """One loss forward and backward into fresh leaf gradients."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    fn(*leaves, **kw).backward()


def _proc_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def peak_rss_mib(kind: str, impl: str, N: int, D: int) -> float:
    """In this (fresh) process: resident memory added by one fwd+bwd, in MiB."""
    ours, ref, _ = LOSSES[kind]
    fn = ours if impl == "mmfuse" else ref
    fwd_bwd(fn, make_inputs(kind, 64, D, torch.float32, "cpu"))  # library start-up, not counted
    inputs = make_inputs(kind, N, D, torch.float32, "cpu")
    before = _proc_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fwd_bwd(fn, inputs)
    return (_proc_kib("VmHWM") - before) / 1024


def peak_rss_subprocess(kind: str, impl: str, N: int, D: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--peak-rss", kind, impl, str(N), str(D)],
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def cpu_table(sizes, D: int, reps: int, losses=tuple(LOSSES)) -> None:
    print(f"CPU ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads), "
          f"fp32, D={D}, fwd+bwd median of {reps}; memory = peak RSS added by the call (fresh process)")
    print("| loss | N | mmfuse ms | PyTorch ms | speed-up | mmfuse MiB | PyTorch MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in losses:
        ours, ref, _ = LOSSES[kind]
        for N in sizes:
            inputs = make_inputs(kind, N, D, torch.float32, "cpu")
            t_ours = median_seconds(lambda: fwd_bwd(ours, inputs), reps) * 1e3
            t_ref = median_seconds(lambda: fwd_bwd(ref, inputs), reps) * 1e3
            m_ours = peak_rss_subprocess(kind, "mmfuse", N, D)
            m_ref = peak_rss_subprocess(kind, "reference", N, D)
            print(f"| {kind} | {N} | {t_ours:.0f} | {t_ref:.0f} | {t_ref / t_ours:.2f}x | "
                  f"{m_ours:.0f} | {m_ref:.0f} | 1/{m_ref / max(m_ours, 1e-9):.0f} |", flush=True)


def _measure(fn, inputs, reps):
    """(median ms, peak GB) of fwd+bwd on CUDA, or the error name when it does not run."""
    torch.cuda.empty_cache()
    try:
        ms = median_seconds(lambda: fwd_bwd(fn, inputs), reps, torch.cuda.synchronize) * 1e3
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(fn, inputs)
        torch.cuda.synchronize()
        return ms, torch.cuda.max_memory_allocated() / 1e9
    except torch.cuda.OutOfMemoryError:
        return "OOM", None
    finally:
        torch.cuda.empty_cache()


def gpu_table(sizes, D: int = 512, reps: int = 5) -> None:
    print(f"\n{torch.cuda.get_device_name()}, bf16 features, D={D}, fwd+bwd median of {reps}; "
          "peak = max_memory_allocated (inputs included)")
    print("| loss | N | mmfuse ms | PyTorch ms | speed-up | mmfuse GB | PyTorch GB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, (ours, ref, _) in LOSSES.items():
        for N in sizes:
            inputs = make_inputs(kind, N, D, torch.bfloat16, "cuda")
            t_ours, m_ours = _measure(lambda *t: ours(*t, backend="triton"), inputs, reps)
            t_ref, m_ref = _measure(ref, inputs, reps)
            fmt = lambda v, f: v if isinstance(v, str) else ("-" if v is None else format(v, f))  # noqa: E731
            speed = f"{t_ref / t_ours:.2f}x" if not isinstance(t_ref, str) and not isinstance(t_ours, str) else "-"
            mem = f"1/{m_ref / m_ours:.0f}" if m_ref and m_ours else "-"
            print(f"| {kind} | {N} | {fmt(t_ours, '.1f')} | {fmt(t_ref, '.1f')} | {speed} | "
                  f"{fmt(m_ours, '.3f')} | {fmt(m_ref, '.2f')} | {mem} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    ap.add_argument("--peak-rss", nargs=4, metavar=("KIND", "IMPL", "N", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_rss:
        kind, impl, N, D = args.peak_rss
        print(f"{peak_rss_mib(kind, impl, int(N), int(D)):.1f}")
        return 0
    cpu_table(args.sizes, args.dim, args.reps, args.losses)
    if torch.cuda.is_available():
        gpu_table([32768, 65536, 262144], args.dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
