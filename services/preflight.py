"""Checks a job passes before any service or worker starts (`JobRunner.run` calls them before
the output dir exists), and the teacher check once the embedded services are up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nebula.algo import algorithm
from nebula.config.job import JobConfig


def preflight(cfg: JobConfig, log: Callable[[str], None] = print) -> str | None:
    """Errors a job is refused for, naming the field, file or row: missing or unreadable
    inputs and rows without their fields (`nebula.inputs`, what the API checks at submit), a
    context too short for `rollout.max_tokens`, a prompt that does not fit beside it, chat
    options the tokenizer cannot honour, a tensor-parallel size that does not divide the
    heads, each stage's own (an SFT or preference row too long, an unrouted mopd domain),
    trackers asked for but not installed, and a `resume_from` checkpoint that is not intact
    or not this job's. Returns that checkpoint's path (None without `resume_from`)."""
    from nebula.prompts import rows_read_once

    with rows_read_once():  # the field checks and the tokenizing parse each file once
        _check_model_and_data(cfg)
    from nebula.trackers import check_trackers

    check_trackers(cfg)
    if cfg.resume_from:
        from nebula.checkpoints import resolve_resume

        return str(resolve_resume(cfg.resume_from, log, cfg))
    return None


def _check_model_and_data(cfg: JobConfig) -> None:
    from transformers import AutoTokenizer

    from nebula.inputs import check_inputs
    from nebula.prompts import context_len, load_prompt_rows

    check_inputs(cfg)
    ctx = context_len(cfg.model)
    budget = ctx - cfg.rollout.max_tokens
    if budget <= 0:
        raise ValueError(f"rollout.max_tokens: {cfg.rollout.max_tokens} completion tokens "
                         f"leave no room for a prompt in the model's {ctx}-token context "
                         "(model.max_model_len)")
    tp = cfg.rollout.tensor_parallel_size
    if tp > 1:
        from transformers import AutoConfig

        mc = AutoConfig.from_pretrained(cfg.model.path)
        heads = [getattr(mc, "num_attention_heads", 0),
                 getattr(mc, "num_key_value_heads", None) or 0]
        if any(h % tp for h in heads if h):
            raise ValueError(f"rollout.tensor_parallel_size: {tp} does not divide the "
                             f"model's attention heads ({heads[0]}) and KV heads "
                             f"({heads[1]}) of {cfg.model.path}")
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    train = [r for d in cfg.datasets.train for r in load_prompt_rows(d, tok, budget)]
    if cfg.datasets.eval is not None:
        load_prompt_rows(cfg.datasets.eval, tok, budget)
    domains = sorted({r.domain for r in train})
    for i, st in enumerate(cfg.stages):
        algorithm(st, cfg).preflight(f"stages.{i}", tok, ctx, domains)


def check_teachers(cfg: JobConfig, address: str | None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every teacher the stages name is hosted at `address` and shares the student's
    tokenizer; returns each one's version."""
    names = cfg.teacher_names()
    if not names:
        return {}
    from nebula.clients.teacher import TeacherClient, check_compatible

    if address is None:
        raise ValueError(f"teachers {', '.join(names)}: no teacher service is running")
    versions = {}
    with TeacherClient(address) as client:
        client.wait_ready()
        for n in names:
            info = check_compatible(client, n, cfg.model.path)
            versions[n] = info["version"]
            log(f"teacher {n} (version {info['version']}) at {address}")
    return versions
