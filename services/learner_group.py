"""The learner as a group of Ray actors: `learner.ranks` data-parallel ranks (one
`LearnerWorker` each), created in one placement group (`learner.placement_strategy`, each
bundle the rank's CPUs, GPUs and custom resources), then a rendezvous: rank 0 names its
address and a free port, and every rank joins the process group there (gloo on CPU, NCCL on
GPU).

Every rank runs every learner call (SPMD: ZeRO shards, gathers and checkpoints are
collective); rank 0 alone talks to Redis, the weight store and the metrics files and hands
the other ranks their shares. A call's result is rank 0's, and a call fails when any rank's
fails: a rank that dies fails the step loudly (the runner's recovery restarts the group).
"""

from __future__ import annotations

from typing import Any, Callable

# How long the ranks' resources may take to become available before the job fails (a
# cluster that cannot hold them never will; one that is busy may within this time).
PLACEMENT_TIMEOUT_S = 300.0


class LearnerGroup:
    def __init__(self, cfg: Any, args: tuple, options: dict[str, Any], name: str,
                 incarnation: int = 0) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from learner.worker import LearnerWorker
        from nebula.resources import learner_bundle

        lc = cfg.learner
        n = lc.ranks
        bundle = learner_bundle(lc)
        self.pg = placement_group([dict(bundle) for _ in range(n)],
                                  strategy=lc.placement_strategy, name=f"{name}-pg")
        if not ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)[0]:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(
                f"learner.ranks: {n} ranks of {bundle} each ({lc.placement_strategy}) could "
                f"not be placed within {PLACEMENT_TIMEOUT_S:.0f}s; the cluster has "
                f"{ray.available_resources()} available of {ray.cluster_resources()}")
        res = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        self.actors = [ray.remote(LearnerWorker).options(
            name=name if r == 0 else f"{name}-rank{r}",
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0.0), resources=res or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=r),
            **options,
        ).remote(*args, incarnation=incarnation, rank=r, world_size=n) for r in range(n)]
        master = ray.get(self.actors[0].rendezvous.remote()) if n > 1 else None
        self.call("setup", master)

    @property
    def lead(self) -> Any:
        """Rank 0's actor handle."""
        return self.actors[0]

    def submit(self, method: str, *args: Any, **kw: Any) -> list[Any]:
        """Start `method` on every rank; the refs, rank 0's first."""
        return [getattr(a, method).remote(*args, **kw) for a in self.actors]

    def call(self, method: str, *args: Any, **kw: Any) -> Any:
        """Run `method` on every rank; rank 0's result (raises if any rank's call fails)."""
        return wait_all(self.submit(method, *args, **kw), None)

    def preempt(self) -> None:
        for a in self.actors:
            a.preempt.remote()

    def dead(self) -> bool:
        """True when a rank's actor is gone (so the group must be replaced)."""
        import ray

        for a in self.actors:
            try:
                ray.get(a.get_status.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return True  # gone, or too stuck to answer: replaced either way
        return False

    def nodes(self) -> list[str]:
        """The Ray node id each rank runs on, in rank order."""
        import ray

        return ray.get([a.node_id.remote() for a in self.actors])

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - dead already
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:  # noqa: BLE001
            pass


def wait_all(refs: list[Any], poll: Callable[[], None] | None, every_s: float = 1.0) -> Any:
    """The first ref's result once every ref is done; the error of the first that fails
    (raised at once: the others may be blocked in a collective with the failed one)."""
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=every_s)
        for ref in ready:
            ray.get(ref)  # raises a failed rank's error now
        if pending and poll:
            poll()
    return ray.get(refs[0])
