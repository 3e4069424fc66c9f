"""The learner across data-parallel ranks (gloo on CPU): on fixed batches, 2 ranks (ZeRO-2 and
ZeRO-3) give the 1-rank run's loss, gradient norm and updated weights over two GRPO steps
(one with a teacher's top-k, OPD's distillation term; in the other a rank has no share of
the groups, `learner.shard`) and a DPO step; the group's checkpoint restores
into fresh engines that take the same next step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from procs import ROOT

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from nebula.config.job import ToyModelConfig  # noqa: E402
from nebula.service_process import free_port  # noqa: E402

TINY = ToyModelConfig(hidden_size=64, layers=2, heads=2, intermediate_size=128,
                      max_position=64, seed=0)
# fp32 sums in another order (two ranks' partial gradients, all-reduced): relative error of
# ~1e-6 per value; 1e-4 on losses, norms and weights leaves room and still catches a wrong
# normalisation (a factor of 2) or a dropped share.
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from nebula.toy_model import build_toy_model

    path = tmp_path_factory.mktemp("tiny_qwen2")
    build_toy_model(path, TINY)
    return str(path)


def _run(model_dir: str, zero: int, world: int, out: Path) -> dict[str, Any]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "ranks_worker.py"),
                                       model_dir, str(zero), str(out),
                                       str(out.with_suffix(".ckpt"))], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        finally:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, logs):
        assert p.returncode == 0, text[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_equal_one_rank(model_dir: str, zero: int, tmp_path: Path) -> None:
    one = _run(model_dir, zero, 1, tmp_path / "one.pt")
    two = _run(model_dir, zero, 2, tmp_path / "two.pt")
    grpo = ("loss", "grad_norm", "tokens", "sequences", "groups", "reward_mean",
            "logprob_diff_abs_mean", "entropy")
    dpo = ("loss", "grad_norm", "tokens", "sequences", "examples", "reward_accuracy",
           "reward_margin", "logp_chosen")
    assert len(one["metrics"]) == len(two["metrics"]) == 3
    assert one["metrics"][0]["distill_kl"] > 0
    for step, (a, b) in enumerate(zip(one["metrics"], two["metrics"])):
        assert b["step_applied"] == 1.0, step
        for key in (grpo + ("distill_kl",) * (step == 0) if step < 2 else dpo):
            assert b[key] == pytest.approx(a[key], rel=RTOL, abs=ATOL), (step, key)
    assert one["weights"].keys() == two["weights"].keys()
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, rtol=RTOL, atol=ATOL, msg=name)
    moved = sum(float((w - two["weights"][n]).abs().sum()) for n, w in one["weights"].items())
    assert moved < 1e-2  # and the steps did change the weights (else equality is trivial):
    from safetensors.torch import load_file

    init = load_file(str(Path(model_dir) / "model.safetensors"))
    assert any(not torch.equal(init[n], w) for n, w in one["weights"].items() if n in init)
    # The group's checkpoint (ZeRO partitions of both ranks) restores into fresh engines that
    # take the same next step as the engines that wrote it.
    assert two["restored"] == {"step": 2}
    for key in ("loss", "grad_norm", "version"):
        assert two["again"][key] == pytest.approx(two["after"][key], rel=1e-6), key
        assert two["after"][key] == pytest.approx(one["after"][key], rel=RTOL), key
