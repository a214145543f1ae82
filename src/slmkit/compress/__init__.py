"""Compression stages: weight quantization (more to come: pruning, low-rank)."""
