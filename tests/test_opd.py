"""On-policy distillation: the per-token advantage on a hand-made case, its trip through the
GRPO surrogate, records with teacher lineage, MOPD routing (config, pre-flight, scorer against
a real teacher service), and a short MOPD job end to end through the real parts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from learner.batch import collate
from nebula.losses import grpo_loss, opd_token_advantages, reverse_kl
from nebula.losses.opd import group_baseline
from nebula.toy_model import build_toy_model
from nebula.algo.mopd import MOPDStage
from nebula.algo.opd import OPDStage
from nebula.config.job import JobConfig, ToyModelConfig
from nebula.config.load import ConfigError, load_model
from nebula.algo.mopd import MOPD, UnroutedDomainError
from nebula.algo.opd import OPD
from rollout.distill import TeacherScore
from rollout.groups import build_group
from nebula.prompts import PromptRow

TOY = dict(hidden_size=64, layers=2, heads=2, intermediate_size=128, max_position=64)


# -- the advantage -----------------------------------------------------------------------------


def test_opd_advantage_hand_made_case() -> None:
    student = [-1.0, -2.0, -0.5]
    teacher = [-0.5, -3.0, -0.5]
    # -(log pi_s - log pi_t): +0.5 where the teacher likes the token more, -1.0 where less.
    assert opd_token_advantages(student, teacher) == pytest.approx([0.5, -1.0, 0.0])
    # plus alpha * the outcome advantage on every token
    assert opd_token_advantages(student, teacher, outcome_advantage=1.0, alpha=0.5) == \
        pytest.approx([1.0, -0.5, 0.5])
    assert reverse_kl(student, teacher) == pytest.approx((-0.5 + 1.0 + 0.0) / 3)
    # a baseline shifts every token alike
    assert opd_token_advantages(student, teacher, baseline=-0.5) == pytest.approx([1.0, -0.5, 0.5])
    # the group baseline is the mean log-ratio over all tokens of the prompt's samples
    assert group_baseline([[0.5, -1.0, 0.0], [1.5]]) == pytest.approx(0.25)
    assert group_baseline([]) == 0.0
    with pytest.raises(ValueError, match="2 student log-probs for 3 teacher"):
        opd_token_advantages([-1.0, -1.0], teacher)


def test_opd_advantage_moves_the_student_toward_the_teacher() -> None:
    """Through the same clipped surrogate as GRPO: one gradient step on the per-token
    advantages raises the log-prob of the token the teacher prefers and lowers the other."""
    torch.manual_seed(0)
    logits = torch.zeros(1, 2, 4, requires_grad=True)  # [B, T, V]
    tokens = torch.tensor([[1, 2]])
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    student = lp.detach()[0].tolist()
    teacher = [student[0] + 1.0, student[1] - 1.0]
    adv = torch.tensor([opd_token_advantages(student, teacher)])
    mask = torch.ones(1, 2)
    loss, _ = grpo_loss(lp, lp.detach(), lp.detach(), adv, mask, 0.2, 0.28, "token", 2.0)
    loss.backward()
    with torch.no_grad():
        new = torch.log_softmax(logits - 1.0 * logits.grad, -1).gather(
            -1, tokens[..., None]).squeeze(-1)[0]
    assert new[0] > student[0] and new[1] < student[1]


def _sample(ids: list[int], lps: list[float]) -> Any:
    return SimpleNamespace(completion_ids=ids, logprobs=lps, text="x", finish_reason="stop")


def _verdict(reward: float) -> Any:
    return SimpleNamespace(reward=reward, status="ok", id="", verifier="exact", passed=reward > 0,
                           reason="", verifier_version="1", elapsed_s=0.0)


def test_record_carries_token_advantages_and_lineage() -> None:
    row = PromptRow(index=0, prompt_ids=[5, 6], prompt_text="ab", reference="1",
                    verifier="exact", metadata={}, domain="add")
    samples = [_sample([7, 8], [-1.0, -2.0]), _sample([9], [-0.1])]
    scores = [TeacherScore("t-add", "abc123", [-0.5, -2.5]), TeacherScore("t-add", "abc123", [-1.1])]
    g = build_group(job_id="j", stage="opd1", row=row, samples=samples,
                    verdicts=[_verdict(1.0), _verdict(0.0)], version=3, ticket=0, step=0,
                    worker="w", teacher=scores,
                    algo=OPD(OPDStage(teacher="t-add", baseline="none")))
    s0, s1 = g.samples
    assert list(s0.token_advantages) == pytest.approx([0.5, -0.5])
    assert list(s1.token_advantages) == pytest.approx([-1.0])
    assert (s0.teacher, s0.teacher_version) == ("t-add", "abc123")
    assert list(s0.teacher_logprobs) == pytest.approx([-0.5, -2.5])
    batch = collate([g], pad_id=0)
    # completion token j of a prompt of length 2 is predicted at column 1 + j
    assert batch.advantages[0, 1:3].tolist() == pytest.approx([0.5, -0.5])
    assert batch.advantages[1, 1].item() == pytest.approx(-1.0)
    # with alpha, the group-normalised outcome advantage (+1 / -1 here) is mixed in
    g2 = build_group(job_id="j", stage="opd1", row=row, samples=samples,
                     verdicts=[_verdict(1.0), _verdict(0.0)], version=3, ticket=0, step=0,
                     worker="w", teacher=scores,
                     algo=OPD(OPDStage(teacher="t-add", alpha=0.5, baseline="none")))
    assert list(g2.samples[0].token_advantages) == pytest.approx([1.0, 0.0], abs=1e-5)
    # the group baseline: the mean of the three log-ratios (0.5, -0.5, -1.0) is -1/3
    g3 = build_group(job_id="j", stage="opd1", row=row, samples=samples,
                     verdicts=[_verdict(1.0), _verdict(0.0)], version=3, ticket=0, step=0,
                     worker="w", teacher=scores,
                     algo=OPD(OPDStage(teacher="t-add", baseline="group")))
    assert list(g3.samples[0].token_advantages) == pytest.approx([0.5 + 1 / 3, -0.5 + 1 / 3])
    assert list(g3.samples[1].token_advantages) == pytest.approx([-1.0 + 1 / 3])


# -- routing -------------------------------------------------------------------------------------


def test_routing_table() -> None:
    assert OPD(OPDStage(teacher="t")).teacher_for("anything") == "t"
    mopd = MOPD(MOPDStage(routing={"add": "t-add", "rev": "t-rev"}))
    assert mopd.teacher_for("add") == "t-add" and mopd.teacher_for("rev") == "t-rev"
    assert mopd.teachers() == ["t-add", "t-rev"]
    with pytest.raises(UnroutedDomainError, match="'mul'"):
        mopd.teacher_for("mul")
    mopd.check_domains(["add", "rev", "add"])
    with pytest.raises(UnroutedDomainError, match="'geo', 'mul'"):
        mopd.check_domains(["add", "mul", "geo"])


def _job(tmp: Path, **over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": {"path": str(tmp / "m")},
        "datasets": {"train": [{"path": "a.jsonl", "domain": "add"},
                               {"path": "r.jsonl", "domain": "rev"}]},
        "teachers": [{"name": "t-add", "path": "ta"}, {"name": "t-rev", "path": "tr"}],
        "stages": [{"type": "mopd", "routing": {"add": "t-add", "rev": "t-rev"}}],
    }
    data.update(over)
    return data


def test_config_errors_name_the_stage(tmp_path: Path) -> None:
    assert load_model(JobConfig, _job(tmp_path)).stages[0].routing["rev"] == "t-rev"
    with pytest.raises(ConfigError, match=r"stages.0.routing: no teacher for domain\(s\) 'rev'"):
        load_model(JobConfig, _job(tmp_path, stages=[{"type": "mopd",
                                                      "routing": {"add": "t-add"}}]))
    with pytest.raises(ConfigError, match=r"stages.0: teacher 't-mul' is not in `teachers`"):
        load_model(JobConfig, _job(tmp_path, stages=[{"type": "opd", "teacher": "t-mul"}]))
    with pytest.raises(ConfigError, match="alpha"):
        load_model(JobConfig, _job(tmp_path, stages=[{"type": "opd", "teacher": "t-add",
                                                      "alpha": -1}]))
    # A shared teacher service is asked at job start, not checked against `teachers`.
    cfg = load_model(JobConfig, _job(tmp_path, teachers=[], cluster={"teacher_address": "h:1"},
                                     stages=[{"type": "opd", "teacher": "t-mul"}]))
    assert cfg.stages[0].teacher == "t-mul"


def test_preflight_rejects_unrouted_row_domains(tmp_path: Path) -> None:
    """Per-row domains are checked when the rows are read, before any service starts."""
    from services.runner import JobRunner

    build_toy_model(tmp_path / "m", ToyModelConfig(**TOY))
    rows = [{"prompt": "1+1=", "answer": "2", "d": "add"}, {"prompt": "rev ab=", "answer": "ba",
                                                           "d": "rev"},
            {"prompt": "2*2=", "answer": "4", "d": "mul"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = str(tmp_path / "m")  # the teachers' paths are checked too: any real model will do
    cfg = load_model(JobConfig, _job(tmp_path, datasets={"train": [
        {"path": str(tmp_path / "rows.jsonl"), "domain_field": "d", "verifier": "exact"}]},
        teachers=[{"name": "t-add", "path": model}, {"name": "t-rev", "path": model}]))
    with pytest.raises(ValueError, match=r"stages.0.routing: .*'mul'"):
        JobRunner(cfg, log=lambda s: None).preflight()


# -- the scorer against a real teacher service ---------------------------------------------------


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from nebula.clients.teacher import teacher_process

    root = tmp_path_factory.mktemp("opd-teachers")
    paths = {n: build_toy_model(root / n, ToyModelConfig(**TOY, seed=s))
             for n, s in (("t-add", 1), ("t-rev", 2), ("student", 3))}
    cfg = {"port": 0, "teachers": [{"name": n, "path": str(paths[n])} for n in ("t-add", "t-rev")]}
    with teacher_process(root / "svc", cfg) as srv:
        yield {"address": srv["address"], "paths": paths}


def test_scorer_routes_each_domain_to_its_teacher(teachers: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.distill import TeacherScorer

    tok = AutoTokenizer.from_pretrained(teachers["paths"]["student"])
    mopd = MOPD(MOPDStage(routing={"add": "t-add", "rev": "t-rev"}))
    scorer = TeacherScorer(teachers["address"], mopd, tok)
    prompts = [tok.encode("12+3="), tok.encode("rev abc=")]
    comps = [[tok.encode("15"), tok.encode("51")], [tok.encode("cba")]]
    out = scorer.score(prompts, ["add", "rev"], comps)
    scorer.close()
    assert [s.teacher for s in out[0]] == ["t-add", "t-add"] and out[1][0].teacher == "t-rev"
    assert all(s.teacher_version for g in out for s in g)
    # each score is that teacher's own forward
    for g, name in ((0, "t-add"), (1, "t-rev")):
        model = AutoModelForCausalLM.from_pretrained(teachers["paths"][name])
        for j, c in enumerate(comps[g]):
            ids = torch.tensor([prompts[g] + c])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            want = lp[len(prompts[g]) - 1:, :].gather(-1, ids[0, len(prompts[g]):, None])
            assert out[g][j].logprobs == pytest.approx(want.squeeze(-1).tolist(), abs=1e-5)


def test_scorer_refuses_unknown_teacher_and_mismatched_tokenizer(
        teachers: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    from transformers import AutoTokenizer

    from rollout.distill import TeacherScorer
    from nebula.clients.teacher import TokenizerMismatchError, UnknownTeacherError

    tok = AutoTokenizer.from_pretrained(teachers["paths"]["student"])
    with pytest.raises(UnknownTeacherError, match="t-mul"):
        TeacherScorer(teachers["address"], OPD(OPDStage(teacher="t-mul")), tok)
    swapped = tmp_path / "swapped"
    shutil.copytree(teachers["paths"]["student"], swapped)
    tj = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (swapped / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerMismatchError, match="tokenizers differ"):
        TeacherScorer(teachers["address"], OPD(OPDStage(teacher="t-add")),
                      AutoTokenizer.from_pretrained(swapped))
