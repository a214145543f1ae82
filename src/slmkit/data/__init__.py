"""Evaluation data: the datasets slmkit knows (catalog.py) and where each is found or fetched (locate.py)."""
