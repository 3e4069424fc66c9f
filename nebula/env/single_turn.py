"""The simplest environment: the model answers once and the verifier scores it."""

from __future__ import annotations

from nebula.env.base import Environment


class SingleTurn(Environment):
    name = "single_turn"
    multi_turn = False  # the rollout generates every sample in one engine call
