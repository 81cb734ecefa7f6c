"""Evaluation: scoring encoder-decoder models and their decoder-only sources with one harness."""
