"""Rollout workers: vLLM engines generating samples with behaviour log-probs."""
