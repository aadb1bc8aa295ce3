"""The two contrastive losses, as the integer flag the primitives of every backend take (contrastive.py
for the math; the torch primitives there, the Triton ones in contrastive_triton.py)."""
CLIP = 0  # symmetric InfoNCE: per-row log-sum-exp, softmax gradients
SIGLIP = 1  # pairwise sigmoid: per-pair softplus, sigmoid gradients
