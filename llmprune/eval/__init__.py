"""Measurement: perplexity, decode speed and weight bytes, lm-eval tasks."""
