"""Evaluation: perplexity and zero-shot multiple choice."""
