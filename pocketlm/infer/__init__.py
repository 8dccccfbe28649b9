"""Inference: sampling, KV-cache generation with per-step statistics, streaming detokenization, chat."""
