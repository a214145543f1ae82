"""Inference: a small backend Protocol, sampling math, text streaming, and the PyTorch backend."""
