"""The floor below engine/ and compress/: module types that stages swap into a model (integer.py: int8/int4
linears) and the helpers that walk a model to find and replace them (walk.py). Nothing here imports engine/ or
the store; integer.py takes its packing math from compress/quant_ops.py (pure functions; moving them below is
part of the architecture step)."""
