"""What a run does when a role fails: replace the actor, or restart the learner group from the
last checkpoint, and redo the iteration; or give up with the reason."""

from __future__ import annotations

from rlhf_ray.config import Config
from rlhf_ray.coordinator import checkpoint as ckpt
from rlhf_ray.runtime.pending import RemoteCallError, describe


class NodeLostError(RuntimeError):
    """A role's actor was lost with its node and no live node can hold a replacement: the run
    stops (naming the node and the last checkpoint) instead of waiting for resources that left."""


def node_lost_message(exc: RemoteCallError, lost: dict, run_dir: str) -> str:
    """What the run says when it stops on a lost node (``Roles.lost_node``): which node, which
    role and why it cannot come back, the last complete checkpoint and how to continue."""
    role = exc.source[0]
    found = ckpt.complete_checkpoints(run_dir)
    bundle = ", ".join(f"{k}: {v:g}" for k, v in lost["bundle"].items())
    fix = f"once the node is back (or --resources.{role} fits the nodes left)"
    then = (f"Last checkpoint: {found[-1]}; {fix}, continue with --resume {found[-1]}" if found else
            f"No checkpoint was written before the loss (--checkpoint.every); {fix}, start the run again")
    return (f"node {lost['node_ip']} (Ray node {lost['node_id']}) was lost with {describe(exc.source)} on it: Ray "
            f"marks the node dead, and no live node has what the {role} role asks for ({{{bundle}}}), so it "
            f"cannot be restarted and the run stops. {then}. (Seen as: {describe(exc.source)} {exc.kind} in "
            f"{exc.what!r}, phase {exc.phase}.)")


class Recovery:
    """What to do when a role fails mid-run.

    * A rollout engine, a reference or a reward replica that died or hung is replaced in its
      placement bundle (an engine also gets the current weights; the other replicas keep running)
      and the iteration is redone with the same prompts, the batch split over the replicas again:
      the coordinator rolled its state back, so no sample is lost or counted twice.
    * A learner rank that died or hung takes the whole group down with it (its collectives
      cannot continue): the group is restarted and reloaded from the last complete checkpoint
      (or from the initial model if there is none), and the iterations since are redone.
    * A failure in the weight sync arrives already blamed on the member that failed: the sync
      pings every member when its call fails (``WeightSync``, ``attribute_failure``), since an
      engine that dies there first shows as an error of learner rank 0's broadcast.
    * A role that raised an error (bad reward function, bad data) is not retried: the same
      input would fail again. Restarts are bounded by resources.max_actor_restarts and
      resources.max_learner_restarts.
    * A role lost with its node (Ray marks the node dead) is restarted on the nodes left when one
      of them can hold it; when none can (it asked for resources only that node had), the run
      stops at once with ``NodeLostError``, naming the node and the last checkpoint."""

    def __init__(self, cfg: Config, roles, coord, run_dir: str, initial_state: dict, say) -> None:
        self.cfg, self.roles, self.coord, self.run_dir = cfg, roles, coord, run_dir
        self.initial_state, self.say = initial_state, say
        self.actor_restarts = self.learner_restarts = 0
        # False from a learner-group restart until the group holds the coordinator's state again: a
        # failure in between leaves fresh learners (the initial model) beside a later iteration.
        self.learners_consistent = True

    def counters(self) -> dict[str, float]:
        return {"faults/actor_restarts": float(self.actor_restarts),
                "faults/learner_restarts": float(self.learner_restarts)}

    def handle(self, exc: RemoteCallError) -> int:
        """Recover from ``exc``; returns the iteration the run continues from.

        A role that fails while another is being replaced (the new engine does not come up,
        learner rank 0 dies while the sync group is rebuilt) is recovered from in turn, within
        the same restart limits; its error says phase "recovery". A learner-group restart cut
        short that way (an engine lost while the new group joins the sync group) is completed
        afterwards: the fresh ranks hold the initial model until they load the checkpoint."""
        while True:
            try:
                redo_from = self._recover_from(exc)
                if not self.learners_consistent:
                    redo_from = self._reload_learners()
                return redo_from
            except RemoteCallError as again:
                if again is exc:  # not recoverable (a role raised an error)
                    raise
                again.phase = again.phase or "recovery"
                exc = again

    def _recover_from(self, exc: RemoteCallError) -> int:
        role = exc.source[0]
        if exc.kind == "error":
            raise exc
        lost = self.roles.lost_node(exc.source)
        if lost is not None and not lost["replaceable"]:
            raise NodeLostError(node_lost_message(exc, lost, self.run_dir)) from exc
        where = f", lost with node {lost['node_ip']}, which the nodes left can replace" if lost else ""
        res = self.cfg.resources
        if role != "learner":
            if self.actor_restarts >= res.max_actor_restarts:
                raise RuntimeError(f"giving up after {self.actor_restarts} actor replacements "
                                   f"(--resources.max_actor_restarts): {exc}") from exc
            self.actor_restarts += 1
            self.say(f"{describe(exc.source)} {exc.kind} (phase {exc.phase}{where}); replacing it and redoing "
                     f"iteration {self.coord.iteration}")
            self.roles.replace(exc.source)
            self.coord.mark_weights_stale()
            return self.coord.iteration
        if self.learner_restarts >= res.max_learner_restarts:
            raise RuntimeError(f"giving up after {self.learner_restarts} learner-group restarts "
                               f"(--resources.max_learner_restarts): {exc}") from exc
        self.learner_restarts += 1
        found = ckpt.complete_checkpoints(self.run_dir)
        self.say(f"{describe(exc.source)} {exc.kind} (phase {exc.phase}{where}); restarting the learner group from "
                 f"{found[-1] if found else 'the initial model (no checkpoint yet)'}")
        self.learners_consistent = False
        self.roles.restart_learners()
        return self._reload_learners()

    def _reload_learners(self) -> int:
        """Fresh learner ranks take the last complete checkpoint (or the initial model: nothing to
        load) and the coordinator its state; returns the iteration to redo from."""
        found = ckpt.complete_checkpoints(self.run_dir)
        if found:
            self.roles.learners.load_checkpoint(found[-1]).result()
            self.coord.load_state_dict(ckpt.load_coordinator_state(found[-1]))
        else:
            self.coord.load_state_dict(self.initial_state)
        self.learners_consistent = True
        self.coord.mark_weights_stale()
        return self.coord.iteration
