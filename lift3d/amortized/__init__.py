"""Amortized text-to-3D: prompt-conditioned generators trained over a prompt corpus (ATT3D,
LATTE3D, ScaleDreamer), with DDP under torchrun. See docs/amortized.md."""
