"""Compression stages: quantization, pruning (sparsity and structured), low-rank factorization; one file of pure
math per technique (*_ops.py) and one stage file each (*_stage.py)."""
