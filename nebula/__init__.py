"""Nebula RL shared core: typed config and wire types.

This package must stay light: importing it never pulls torch, vllm, ray or deepspeed,
so every entry point can read its config before importing anything heavy.
"""

__version__ = "0.1.0"
