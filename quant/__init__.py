"""Precision backends for training (fp32, bf16, FP8) and quantizers for inference (W8A8, W4A16 with AWQ)."""
