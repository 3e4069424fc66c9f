"""Synthetic verifiable tasks for toy recipes and tests (pure Python, no downloads)."""
