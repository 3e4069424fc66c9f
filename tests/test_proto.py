"""The committed stubs in nebula/v1 must match what protoc makes of proto/ today."""

from nebula import protogen
from nebula.v1 import teacher_pb2, trajectory_pb2, verifier_pb2


def test_generated_stubs_are_current() -> None:
    assert protogen.stale_files() == [], "run: python -m nebula.protogen"


def test_trajectory_record_round_trips() -> None:
    group = trajectory_pb2.TrajectoryGroup(group_id="g1", prompt_ids=[1, 2, 3])
    s = group.samples.add(completion_ids=[4, 5], behaviour_logprobs=[-0.5, -1.0],
                          policy_versions=[3, 4], loss_mask=[1, 1], reward=1.0)
    s.verify.CopyFrom(verifier_pb2.VerifyResult(reward=1.0, passed=True))
    back = trajectory_pb2.TrajectoryGroup.FromString(group.SerializeToString())
    assert back == group
    assert list(back.samples[0].policy_versions) == [3, 4]
    assert teacher_pb2.TeacherLogprobsRequest(teacher="t").teacher == "t"


def test_packages_are_nebula_v1() -> None:
    for mod in (verifier_pb2, teacher_pb2, trajectory_pb2):
        assert mod.DESCRIPTOR.package == "nebula.v1"
