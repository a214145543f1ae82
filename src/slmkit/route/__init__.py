"""Hybrid deployment: the small model first, a larger one when it is unsure (policies, targets, cascade,
calibration), and what running that in a server needs (response cache, A/B split, drift watch)."""
