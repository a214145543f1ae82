"""Evaluation: perplexity, multiple-choice tasks, divergence from a teacher, speed, and comparison reports."""
