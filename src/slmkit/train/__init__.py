"""Training: data readers and packing (data.py), the loop with checkpoints and resume (loop.py), distillation
losses (losses.py) and the teacher's cached top-k log-probabilities (teacher.py); stages (distill.py) on top."""
