"""GPU check and benchmark of the Triton attention kernels against torch SDPA's backends.

    python bench/gpu_attention.py                 # CUDA: correctness, then one timing table, then end to end
    python bench/gpu_attention.py --quick         # fewer shapes, no end-to-end run
    python bench/gpu_attention.py --compile-only  # no GPU needed: compile every GPU config for sm_90

1. Correctness on CUDA, bf16 and fp16, every temporary NaN-poisoned, against the fp32 reference:
   the kernels' output and LSE (prefill, mixed lengths, chunked prefill, decode with 1/7/64
   splits, verification, non-causal padded encoder, D = 64/80/96/128/256), each autotuning
   candidate config on a chunked-prefill and a decode case, and attention()'s autotuned path.
2. Timings, triton.testing.do_bench medians, in one table: prefill in TFLOP/s (causal counts half
   the FLOPs) of ours vs SDPA's flash, cuDNN and memory-efficient backends; decode in GB/s of K/V
   read (2 * B * Hkv * L * D * bytes per call) for GQA 32/8, D=128, ours (the engine's exact
   attention() call: static cache, per-row kv_len) vs the same SDPA backends (full cache, no mask).
3. End to end (not with --quick): decode tokens/s of the engine on a random Llama-style model,
   attention backend "auto" (our kernels) vs "sdpa", same model, same run.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from mmfuse.kernels import attention, attention_reference, lse_reference, set_backend
from mmfuse.kernels import flash_decode as fd
from mmfuse.kernels import flash_prefill as fp
from mmfuse.kernels.testing import poisoned_allocations

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _qkv(B, Hq, Hkv, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.float32).to(dtype)  # noqa: E731
    return mk(B, Hq, Tq, D), mk(B, Hkv, Tk, D), mk(B, Hkv, Tk, D)


def _ints(xs):
    return None if xs is None else torch.tensor(xs, device="cuda", dtype=torch.long)


# (name, B, Hq, Hkv, Tq, Tk, D, causal, q_start, kv_len)
CASES = [
    ("prefill causal GQA4", 2, 32, 8, 1000, 1000, 128, True, None, None),
    ("prefill mixed lengths D64", 3, 8, 8, 777, 777, 64, True, [0, 0, 0], [777, 300, 5]),
    ("encoder padded non-causal D80", 4, 12, 12, 197, 197, 80, False, None, [197, 50, 1, 120]),
    ("chunked prefill D96", 2, 16, 4, 300, 2048, 96, True, [1700, 0], [2000, 300]),
    ("decode mixed lengths", 4, 32, 8, 1, 4096, 128, True, [0, 999, 4094, 2500], [1, 1000, 4095, 2501]),
    ("verification 5 tokens", 2, 28, 4, 5, 1024, 128, True, [100, 900], [105, 905]),
    ("decode D256 GQA16", 1, 16, 1, 1, 3000, 256, True, [2000], [2001]),
]


def _max_err(out, ref, tol):
    err = ((out.float() - ref).abs() / (tol + tol * ref.abs())).max().item()
    return err, err <= 1.0 and torch.isfinite(out).all().item()


def _report(err, ok, label):
    print(f"  {'PASS' if ok else 'FAIL'}  {label}  err/tol {err:.3f}")
    return ok


def _check_configs(kind, kernel, configs, q, k, v, q_start, kv_len) -> bool:
    """bf16, causal: each autotuning candidate, then attention()'s autotuned path."""
    sem = dict(causal=True, q_start=_ints(q_start), kv_len=_ints(kv_len))
    ref = attention_reference(q.float(), k.float(), v.float(), **sem)
    ok = True
    for cfg in configs:
        ok &= _report(*_max_err(kernel(q, k, v, config=cfg, **sem), ref, TOL[q.dtype]), f"bfloat16 {kind} config {cfg}")
    return ok & _report(*_max_err(attention(q, k, v, **sem), ref, TOL[q.dtype]),
                        f"bfloat16 {kind} via attention() (autotuned)")


def check_correctness() -> bool:
    """Every case in bf16 and fp16 (output and LSE, one fixed config so compiles stay few), each
    autotuning candidate on a chunked-prefill and a decode case, and attention()'s autotuned path."""
    ok_all = True
    with poisoned_allocations():
        for dtype in (torch.bfloat16, torch.float16):
            for i, (name, B, Hq, Hkv, Tq, Tk, D, causal, qs, kl) in enumerate(CASES):
                q, k, v = _qkv(B, Hq, Hkv, Tq, Tk, D, dtype, seed=i)
                sem = dict(causal=causal, q_start=_ints(qs), kv_len=_ints(kl))
                ref = attention_reference(q.float(), k.float(), v.float(), **sem)
                lref = lse_reference(q.float(), k.float(), v.float(), **sem)
                fin = torch.isfinite(lref)
                if Tq <= fd.MAX_QUERY_TOKENS:
                    runs = [(f"{n} splits", fd.decode_attention(q, k, v, return_lse=True, num_splits=n,
                                                                config=fd.GPU_CONFIGS[0], **sem)) for n in (1, 7, 64)]
                else:
                    runs = [("", fp.prefill_attention(q, k, v, return_lse=True, config=fp.GPU_CONFIGS[0], **sem))]
                for label, (out, lse) in runs:
                    err, ok = _max_err(out, ref, TOL[dtype])
                    ok = ok and torch.equal(torch.isinf(lse), torch.isinf(lref)) and \
                        torch.allclose(lse[fin], lref[fin], atol=1e-2, rtol=1e-3)
                    ok_all &= _report(err, ok, f"{str(dtype)[6:]:8s} {name:30s} {label:9s} (+LSE)")
        q, k, v = _qkv(2, 16, 4, 300, 2048, 128, torch.bfloat16, seed=99)
        ok_all &= _check_configs("prefill", fp.prefill_attention, fp.GPU_CONFIGS, q, k, v, [1700, 0], [2000, 300])
        ok_all &= _check_configs("decode", fd.decode_attention, fd.GPU_CONFIGS, q[:, :, :3], k, v,
                                 [1997, 297], [2000, 300])
    return ok_all


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def _time(fn) -> float:
    """Median milliseconds of fn() (do_bench), or nan if this backend rejects the inputs."""
    import triton.testing

    try:
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except RuntimeError:
        return float("nan")


def _time_sdpa(backend: str, q, k, v, **kw) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])]):
        return _time(lambda: F.scaled_dot_product_attention(q, k, v, **kw))


def prefill_rows(quick: bool):
    """(label, unit, {method: rate}) rows for prefill shapes: B * S = 16k tokens, H * D = 2048."""
    shapes = [(D, S, True, 1) for D in (64, 128) for S in ((1024, 4096) if quick else (1024, 2048, 4096, 8192))]
    shapes += [(128, 4096, False, 1), (128, 4096, True, 4)]  # non-causal; GQA 32/8
    rows = []
    for D, S, causal, group in shapes:
        B, Hq = max(1, 16384 // S), 2048 // D
        q, k, v = _qkv(B, Hq, Hq // group, S, S, D, torch.bfloat16)
        flops = 4 * B * Hq * S * S * D * (0.5 if causal else 1.0)
        rate = lambda ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
        res = {"ours": rate(_time(lambda: attention(q, k, v, causal=causal)))}
        for name in SDPA_BACKENDS:
            res[name] = rate(_time_sdpa(name, q, k, v, is_causal=causal, enable_gqa=group > 1))
        label = f"prefill bf16 B={B} H={Hq}/{Hq // group} S={S} D={D} {'causal' if causal else 'full'}"
        rows.append((label, "TFLOP/s", res))
    return rows


def decode_rows(quick: bool):
    """Decode, GQA 32/8, D=128, bf16: one new token against a static cache of L positions."""
    shapes = [(1, 8192), (16, 8192), (8, 65536)] + ([] if quick else [(1, 1024), (1, 65536), (64, 2048)])
    rows = []
    for B, L in shapes:
        q, k, v = _qkv(B, 32, 8, 1, L, 128, torch.bfloat16)
        q_start, kv_len = _ints([L - 1] * B), _ints([L] * B)
        nbytes = 2 * B * 8 * L * 128 * 2
        rate = lambda ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
        res = {"ours": rate(_time(lambda: attention(q, k, v, causal=True, q_start=q_start, kv_len=kv_len)))}
        for name in SDPA_BACKENDS:
            res[name] = rate(_time_sdpa(name, q, k, v, enable_gqa=True))
        rows.append((f"decode bf16 B={B} H=32/8 L={L} D=128", "GB/s K/V", res))
    return rows


def print_table(rows, device_name: str) -> None:
    methods = ["ours"] + list(SDPA_BACKENDS)
    print(f"\nTriton attention vs torch SDPA backends on {device_name} "
          f"(torch {torch.__version__}, triton {__import__('triton').__version__}; do_bench medians)")
    head = f"| case | unit | {' | '.join(methods)} | ours/flash | ours/cudnn |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for label, unit, res in rows:
        cells = " | ".join("n/a" if math.isnan(res[m]) else f"{res[m]:.0f}" for m in methods)
        ratios = " | ".join("n/a" if math.isnan(res["ours"] / res[m]) else f"{res['ours'] / res[m]:.2f}x"
                            for m in ("flash", "cudnn"))
        print(f"| {label} | {unit} | {cells} | {ratios} |")


def end_to_end() -> None:
    """Decode tokens/s of the engine, our kernels vs SDPA, same random model, same run."""
    from mmfuse.decoder.benchmark import bench_decode
    from mmfuse.decoder.config import DecoderConfig
    from mmfuse.decoder.transformer import Decoder

    cfg = DecoderConfig(vocab_size=32000, n_layer=16, n_head=32, n_kv_head=8, d_model=2048, head_dim=64,
                        d_ff=8192, max_seq_len=8192, family="llama", norm="rmsnorm", act="silu", gated_mlp=True,
                        learned_pos=False, qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=False)
    model = Decoder.random(cfg, dtype=torch.bfloat16, device="cuda")
    print(f"\nEnd to end: random Llama-style model, {model.num_params() / 1e9:.2f} B params, bf16, greedy decode")
    print("| batch | prompt | new | cuda graph | sdpa tok/s | ours tok/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for batch, prompt, new, graph in [(1, 4000, 64, True), (16, 2000, 64, True), (1, 4000, 64, False)]:
        res = {}
        for name in ("sdpa", "auto"):
            set_backend(name)
            res[name] = bench_decode(model, batch, prompt, new, repeats=3, cuda_graph=graph)["decode_tok_s"]
        set_backend("auto")
        print(f"| {batch} | {prompt} | {new} | {graph} | {res['sdpa']:.0f} | {res['auto']:.0f} | "
              f"{res['auto'] / res['sdpa']:.2f}x |")


def compile_only() -> bool:
    """Compile every autotuning candidate for sm_90 (H100/H200) without a GPU; print shared memory
    and whether the pipeliner used async copies and the compiler used wgmma."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    ok_all = True

    def build(kernel, consts, launch):
        sig, attrs = {}, {}
        ptrs = {"Q", "K", "V", "Out", "Lse", "OPart", "LsePart", "QStart", "KvLen"}
        for i, n in enumerate(kernel.arg_names):
            if n in consts:
                sig[n] = "constexpr"
            elif n.startswith("stride_") and n.endswith("d"):
                consts[n], sig[n] = 1, "constexpr"
            elif n in ptrs:
                sig[n] = {"QStart": "*i64", "KvLen": "*i64", "Lse": "*fp32", "OPart": "*fp32",
                          "LsePart": "*fp32"}.get(n, "*bf16")
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[n] = "fp32" if n == "qk_scale" else "i32"
                if n.startswith("stride_"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = triton.compiler.ASTSource(fn=kernel, constexprs=consts, signature=sig, attrs=attrs)
        t0 = time.perf_counter()
        cc = triton.compile(src, target=target, options=backend.parse_options(launch).__dict__)
        ir = cc.asm["ttgir"]
        return (cc.metadata.shared, "warp_group_dot" in ir, ir.count("async_copy_global_to_local"),
                time.perf_counter() - t0)

    common = dict(HAS_Q_START=True, HAS_KV_LEN=True, CAUSAL=True, WRITE_LSE=False, PRECISION="tf32")
    jobs = []
    for D in (64, 80, 128, 256):
        for c in fp.GPU_CONFIGS:
            meta = dict(common, HEAD_DIM=D, BLOCK_D=max(16, 1 << (D - 1).bit_length()),
                        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"])
            jobs.append((f"prefill D={D} {c}", fp.flash_prefill_kernel, meta, c))
    for D, rows in ((128, 16), (64, 16), (128, 128)):
        for c in fd.GPU_CONFIGS:
            meta = dict(common, SINGLE_SPLIT=False, HEAD_DIM=D, BLOCK_D=D, BLOCK_M=rows, BLOCK_N=c["BLOCK_N"])
            jobs.append((f"decode D={D} rows={rows} {c}", fd.flash_decode_kernel, meta, c))
    jobs.append(("combine D=128 S=32", fd.combine_kernel,
                 dict(WRITE_LSE=True, HEAD_DIM=128, BLOCK_D=128, BLOCK_S=32, BLOCK_R=1),
                 dict(num_warps=4, num_stages=1)))
    for label, kernel, meta, c in jobs:
        launch = {n: c[n] for n in ("num_warps", "num_stages")}
        try:
            smem, wgmma, copies, secs = build(kernel, dict(meta), launch)
            fits = smem <= 227 * 1024
            print(f"  {'ok  ' if fits else 'SMEM'} {label}: shared {smem // 1024} KiB, wgmma {wgmma}, "
                  f"async copies {copies}, {secs:.1f} s")
        except Exception as e:  # noqa: BLE001  (report every failing config, keep going)
            ok_all = False
            print(f"  FAIL {label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return ok_all


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes, no end-to-end run")
    ap.add_argument("--compile-only", action="store_true", help="compile for sm_90 only (no GPU needed)")
    args = ap.parse_args(argv)
    if args.compile_only:
        return 0 if compile_only() else 1
    if not torch.cuda.is_available():
        print("gpu_attention: no CUDA device; run with --compile-only to check the GPU build without one")
        return 2
    name = torch.cuda.get_device_name()
    print(f"Correctness on {name} (bf16, fp16; fp32 reference):")
    ok = check_correctness()
    print("correctness:", "all PASS" if ok else "FAILURES above")
    print_table(prefill_rows(args.quick) + decode_rows(args.quick), name)
    if not args.quick:
        end_to_end()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
