"""A whole PPO run as one object: start the roles, resume, iterate, evaluate, checkpoint,
recover, finish.

``run(cfg, run_dir)`` (what ``python -m rlhf_ray.launch`` calls) checks the inputs before Ray
starts (``preflight``), starts Ray and the roles, and hands them to a :class:`Run`, whose
methods are the steps of the README's description of a run. ``Run`` itself never touches Ray:
its roles and coordinator come in from outside, so the lifecycle is tested with the
in-process fakes the loop's tests use (``tests/unit/test_run.py``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Callable

from rlhf_ray.batch import decode_rows
from rlhf_ray.backends.engine import engine_label
from rlhf_ray.config import Config, config_to_dict, redacted
from rlhf_ray.coordinator import checkpoint as ckpt
from rlhf_ray.coordinator.gold import write_eval_samples, write_samples_md
from rlhf_ray.coordinator.loop import NonFiniteError
from rlhf_ray.coordinator.preflight import Inputs
from rlhf_ray.coordinator.records import (Records, format_eval_line, format_line, format_progress, print_summary,
                                          summarize)
from rlhf_ray.coordinator.recovery import Recovery
from rlhf_ray.coordinator.rollout_dump import RolloutDumper
from rlhf_ray.coordinator.startup import StartupClock
from rlhf_ray.runtime.pending import RemoteCallError


def sample_lines(batch, tokenizer, k: int) -> list[str]:
    """The first ``k`` prompt/response pairs of a batch as text, for the terminal."""
    head = batch.select(slice(0, k))
    prompts, responses = decode_rows(head, tokenizer)
    scores = head.scores.tolist() if head.scores is not None else [float("nan")] * len(head)
    return [f"  sample: {p!r} -> {r!r} (score {s:.3f})" for p, r, s in zip(prompts, responses, scores)]


class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to stop after the current iteration (and checkpoint);
    a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            print(f"\nreceived signal {signum}: stopping after this iteration (Ctrl-C again to abort)", flush=True)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


class Run:
    """One PPO run over started roles.

    Args:
        cfg: the run's config.
        run_dir: where records and checkpoints go (exists).
        inputs: what pre-flight prepared (prompts, tokenizer, evaluation prompts).
        roles: the running roles: ``learners`` (save/load checkpoints), ``replace(source)``,
            ``restart_learners()``, ``shutdown()``, ``placement``.
        coord: the PPO coordinator (``step``, ``evaluate``, ``state_dict``, ...) over those roles.
        say: where progress lines go (the progress bar's ``write`` in a terminal).
        wandb: a ``WandbRun`` to mirror the records to, or None.
        stream: where the progress bar draws (stderr); it is drawn only when that is a terminal,
            else a plain progress line is said every logging.log_every iterations.
    """

    def __init__(self, cfg: Config, run_dir: str, inputs: Inputs, roles, coord,
                 say: Callable[[str], None] = print, wandb=None, stream: IO[str] | None = None) -> None:
        self.cfg, self.run_dir, self.inputs, self.roles, self.coord = cfg, run_dir, inputs, roles, coord
        self.records = Records(run_dir, cfg.logging.tensorboard, inputs.eval_prompts is not None, wandb)
        self.dumper = RolloutDumper(run_dir, cfg.logging.dump_rollouts_every, inputs.tokenizer, cfg.ppo.kl_estimator)
        self.stream = stream
        self.started = time.perf_counter()
        self.initial_state = coord.state_dict()
        self.recovery = Recovery(cfg, roles, coord, run_dir, self.initial_state, self._say)
        self.stop = StopFlag()
        self.saved_at = -1
        self.resumed_at: int | None = None
        self.completed = False
        self._say_fn = say
        self.bar = None

    @property
    def _bar_drawn(self) -> bool:
        return self.bar is not None and not self.bar.disable

    def _say(self, line: str) -> None:
        (self.bar.write if self._bar_drawn else self._say_fn)(line)  # bar.write keeps the bar below the line

    # ------------------------------------------------------------------ the steps of a run
    def resume(self, checkpoint: str) -> None:
        """Continue from ``checkpoint``: learner state, coordinator state, the engines re-synced
        before the first generation; records of iterations after it are dropped, those before it
        kept for the summary. Later checkpoints of the run resumed from are moved aside: they
        belong to the branch this one abandons, and recovery or a later ``--resume`` of the run
        directory (both take the newest checkpoint) must not jump back onto it."""
        self.roles.learners.load_checkpoint(checkpoint).result()
        self.coord.load_state_dict(ckpt.load_coordinator_state(checkpoint))
        self.coord.mark_weights_stale()  # engines start from the checkpoint's policy, not model.path
        self.saved_at = self.resumed_at = self.coord.iteration
        self.records.forget_from(self.coord.iteration)  # a crash after the checkpoint logged iterations
        self.records.recall()
        moved = ckpt.set_aside_after(checkpoint)
        if moved:
            self._say(f"moved {len(moved)} later checkpoint(s) of the run resumed from to {os.path.dirname(moved[0])} "
                      f"({', '.join(os.path.basename(m) for m in moved)}): this run continues from "
                      f"{os.path.basename(checkpoint)} and never uses them; delete them when not needed")
        self._say(f"resumed from {checkpoint} at iteration {self.coord.iteration}")

    def iterate(self) -> None:
        """Iterations until ppo.iterations or a stop request, with evaluations, checkpoints and
        recovery from role failures; ends with a checkpoint when checkpoint.save_on_stop."""
        while True:
            try:  # a role may die in an iteration, an evaluation or while a checkpoint is written
                if self.wants_eval():
                    self.evaluate()
                if self.coord.iteration >= self.cfg.ppo.iterations or self.stop.requested:
                    if self.cfg.checkpoint.save_on_stop:
                        self.checkpoint()
                    break
                self.log(self.coord.step())
                if self.cfg.checkpoint.every and self.coord.iteration % self.cfg.checkpoint.every == 0:
                    self.checkpoint()
            except RemoteCallError as exc:
                try:
                    self.recover(exc)
                except BaseException as final:
                    self.save_before_failing(final)
                    raise
            except NonFiniteError as exc:
                self.save_before_failing(exc)
                raise
        self.completed = self.coord.iteration >= self.cfg.ppo.iterations

    def learner_intact(self, error: BaseException) -> bool:
        """Whether the learners still hold exactly the policy of the coordinator's state (the last
        completed iteration: a failed step rolls the coordinator back) after ``error`` ended the
        run: the failure came from a role other than the learners (or is recovery giving up on
        one), outside the update, and no learner-group restart is half done; or every sample was
        unusable (found before the update)."""
        if isinstance(error, NonFiniteError):
            return True
        failed = error if isinstance(error, RemoteCallError) else error.__cause__  # "giving up" chains it
        return (isinstance(failed, RemoteCallError) and failed.source[0] != "learner" and failed.phase != "update"
                and self.recovery.learners_consistent)

    def save_before_failing(self, error: BaseException) -> None:
        """A checkpoint of the last completed iteration before ``error`` ends the run, where the
        learners are intact (``learner_intact``): e.g. a reward function that raises at iteration
        900 leaves a run that resumes at 900 once it is fixed. Follows checkpoint.save_on_stop; a
        save that fails too is reported and the original error still ends the run."""
        if not (self.cfg.checkpoint.save_on_stop and self.coord.iteration > 0 and self.learner_intact(error)):
            return
        self._say(f"the run stops on an error that left the learner intact: saving iteration {self.coord.iteration} "
                  "first (fix the cause, then --resume the run directory)")
        try:
            self.checkpoint()
        except Exception as exc:  # noqa: BLE001 - the error that ends the run is the original one
            self._say(f"no checkpoint before stopping: saving failed too ({exc})")

    def wants_eval(self) -> bool:
        """Before the first update, every eval.every iterations, and after the last one."""
        return (self.inputs.eval_prompts is not None and not self.stop.requested
                and self.records.evaluated_at != self.coord.iteration
                and (self.coord.iteration % self.cfg.eval.every == 0
                     or self.coord.iteration >= self.cfg.ppo.iterations))

    def evaluate(self) -> dict:
        """The policy on the held-out prompts now (see ``PPOCoordinator.evaluate``)."""
        metrics, batch = self.coord.evaluate()
        fields = self.inputs.eval_prompts.columns(batch.prompt_index.tolist())  # each row's evaluation prompt
        gold = write_eval_samples(self.run_dir, self.coord.iteration, batch, self.inputs.tokenizer, self.inputs.gold,
                                  fields)
        if gold is not None:
            metrics["eval/gold_mean"] = gold
        self.records.add_eval(metrics)
        self._say(format_eval_line(metrics))
        for line in sample_lines(batch, self.inputs.tokenizer, self.cfg.logging.print_samples):
            self._say("  eval" + line)
        return metrics

    def log(self, metrics: dict) -> None:
        """Record one iteration: files, progress bar, and every logging.log_every a full line."""
        metrics.update(self.recovery.counters())
        if self.inputs.gold is not None:
            # the fields of each row's prompt (the coordinator keeps them through dynamic sampling's renumbering)
            fields = self.inputs.prompts.columns(self.coord.row_prompts)
            metrics["gold_mean"] = self.inputs.gold.mean(self.coord.last_batch, fields)
        self.records.add(metrics)
        self.dumper.maybe_dump(int(metrics["iteration"]), self.coord.last_batch)
        drawn = self._bar_drawn
        if drawn:
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl_mean']:.3f}",
                                 s_it=f"{metrics['time/iteration']:.2f}")
        if metrics["iteration"] % self.cfg.logging.log_every == 0:
            progress = (format_progress(int(metrics["iteration"]) + 1, self.cfg.ppo.iterations,
                                        time.perf_counter() - self.started, self.records.history)
                        if not drawn and self.cfg.logging.progress_bar else "")
            self._say(format_line(metrics) + progress)
            for line in sample_lines(self.coord.last_batch, self.inputs.tokenizer, self.cfg.logging.print_samples):
                self._say(line)

    def checkpoint(self) -> str | None:
        """Save the learner and coordinator state at the current iteration (once per iteration)."""
        if self.saved_at == self.coord.iteration:
            return None
        path = ckpt.save_checkpoint(self.run_dir, self.coord.iteration, self.coord.state_dict(), self.cfg,
                                    self.roles.learners, self.cfg.model.path)
        self.saved_at = self.coord.iteration
        self._say(f"checkpoint: {path}")
        return path

    def recover(self, exc: RemoteCallError) -> None:
        """Replace what failed and continue from the iteration to redo (``Recovery``); raises when
        the failure is not recoverable."""
        redo_from = self.recovery.handle(exc)
        self.records.forget_from(redo_from)
        if self.bar is not None:
            self.bar.n = redo_from
            self.bar.refresh()

    def finish(self) -> dict:
        """Close the records, write the plot and summary.json, stop the roles; returns the summary."""
        from rlhf_ray.coordinator.plot import write_plot

        self.dumper.close()
        self.records.close()
        records, cfg = self.records, self.cfg
        summary = {**summarize(records.history), "completed": self.completed, "stopped": self.stop.requested,
                   "final_iteration": self.coord.iteration, "run_dir": os.path.abspath(self.run_dir),
                   "placement": self.roles.placement}
        if self.resumed_at is not None:
            summary["resumed_at"] = self.resumed_at  # the figures above cover the iterations before it too
        if records.evals is not None and records.eval_history:
            summary["eval"] = {"first": records.eval_history[0], "last": records.eval_history[-1],
                               "prompts": len(self.inputs.eval_prompts.token_ids),
                               "temperature": cfg.eval.temperature}
            first, last = (int(records.eval_history[i]["iteration"]) for i in (0, -1))
            try:
                summary["samples"] = write_samples_md(self.run_dir, first, last)
            except (OSError, ValueError) as exc:  # e.g. a resumed run whose first evaluation's file is gone
                self._say(f"samples.md not written: {exc}")
        if os.path.getsize(records.metrics.path) > 0:
            summary["plot"] = write_plot(records.metrics.path, os.path.join(self.run_dir, "curves.png"),
                                         eval_path=records.evals.path if records.evals is not None else None)
        with open(os.path.join(self.run_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        self.roles.shutdown()
        return summary

    def execute(self, resume_from: str | None = None) -> dict:
        """Resume if asked, iterate, and always finish (also after an error or Ctrl-C)."""
        from tqdm import tqdm

        self.stop.install()
        stream = self.stream if self.stream is not None else sys.stderr
        # A bar redraws itself with carriage returns: in a log file (or `ray job submit`'s log)
        # every frame stays, so without a terminal log() says a plain progress line instead.
        tty = hasattr(stream, "isatty") and stream.isatty()
        self.started = time.perf_counter()
        self.bar = tqdm(total=self.cfg.ppo.iterations, initial=self.coord.iteration, file=stream,
                        disable=not (self.cfg.logging.progress_bar and tty), dynamic_ncols=True)
        try:
            if resume_from:
                self.resume(resume_from)
                self.bar.n = self.coord.iteration
                self.bar.refresh()
            self.iterate()
        finally:
            self.coord.close()  # the pipeline's threads end before the roles do
            self.bar.close()
            self.bar = None
            summary = self.finish()
        print_summary(summary)
        return summary


def roles_line(cfg: Config, seconds: float, reference_from_learner: bool) -> str:
    """The start-up line naming the roles that run. With reference.from_learner (LoRA) there is no
    reference actor: the learner ranks compute the reference logprobs with the adapters off."""
    def replicated(role: str, n: int) -> str:
        return f"{n} {role} replicas" if n > 1 else role

    reference = "" if reference_from_learner else replicated("reference", cfg.reference.replicas) + ", "
    learners = (f"{cfg.learner.num_ranks} learner rank(s) ({engine_label(cfg.learner)}"
                + ("; also the reference, adapters off)" if reference_from_learner else ")"))
    return (f"roles up in {seconds:.1f} s: {cfg.rollout.num_engines} rollout engine(s), {reference}"
            f"{replicated('reward', cfg.reward.replicas)}, {learners}")


def write_config(cfg: Config, run_dir: str) -> str:
    """``<run_dir>/config.json``, the config as a record with secrets in URLs masked (``redacted``):
    a resumed run takes its config from the YAML and command line again, never from here."""
    path = os.path.join(run_dir, "config.json")
    with open(path, "w") as fh:
        json.dump(redacted(config_to_dict(cfg)), fh, indent=2)
    return path


def run(cfg: Config, run_dir: str, ray_address: str | None = None, resume: str | None = None,
        started_at: float | None = None) -> dict:
    """Run PPO to ``ppo.iterations``; returns the summary (also written to <run_dir>/summary.json).

    ``resume``: a checkpoint, a run directory, or "auto" (see ``checkpoint.resolve_resume``);
    the run then continues in the checkpoint's run directory. ``started_at``: the launcher's
    ``time.perf_counter()`` at start, so the start-up figure includes its imports."""
    import ray

    from rlhf_ray.coordinator.loop import PPOCoordinator
    from rlhf_ray.coordinator.preflight import prepare_inputs
    from rlhf_ray.runtime import quiet
    from rlhf_ray.runtime.cluster import namespace_for, start_ray
    from rlhf_ray.runtime.groups import Roles, SharedBatch
    from rlhf_ray.runtime.placement import check_fits, placement_plan
    from rlhf_ray.runtime.wandb_log import WandbRun, require_wandb

    clock = StartupClock(started_at)
    require_wandb(cfg.logging)  # a missing optional extra fails before anything starts
    inputs = prepare_inputs(cfg)
    clock.lap("inputs")
    resume_from = ckpt.resolve_resume(resume, cfg) if resume else None
    if resume_from:
        run_dir = ckpt.run_dir_of(resume_from)
    os.makedirs(run_dir, exist_ok=True)
    print(f"run directory: {os.path.abspath(run_dir)}")
    write_config(cfg, run_dir)
    # W&B before Ray: a login or project problem stops the run before anything starts.
    wandb = WandbRun(cfg.logging, run_dir, redacted(config_to_dict(cfg)), resume=bool(resume_from)) \
        if cfg.logging.wandb else None
    notices = None
    try:
        where = start_ray(ray_address, namespace_for(cfg.logging.ray_namespace, run_dir))
        with open(os.path.join(run_dir, "ray.json"), "w") as fh:
            json.dump(where, fh, indent=2)
        notices = quiet.install(run_dir) if cfg.logging.filter_warnings else None
        clock.lap("ray")
        check_fits(placement_plan(cfg), ray.cluster_resources())
        roles = Roles(cfg)
        clock.lap("roles")
        print(roles_line(cfg, clock.phases["roles"], roles.reference_from_learner))
        with open(os.path.join(run_dir, "placement.json"), "w") as fh:
            json.dump(roles.placement, fh, indent=2)
        try:
            coord = PPOCoordinator(cfg, inputs.prompts, inputs.pad_id, inputs.eos_ids, roles.rollout, roles.reference,
                                   roles.reward, roles.learners, roles.weight_sync, put=SharedBatch,
                                   eval_prompts=inputs.eval_prompts, tokenizer=inputs.tokenizer)
        except BaseException:
            roles.shutdown()
            raise
        clock.lap("coordinator")
        print(clock.line() + (f"; W&B: {wandb.where}" if wandb is not None else ""))
        clock.save(os.path.join(run_dir, "startup.json"))
        the_run = Run(cfg, run_dir, inputs, roles, coord, wandb=wandb)
        wandb = None  # the run's records finish it from here on
        return the_run.execute(resume_from)
    finally:
        if wandb is not None:  # start-up failed before the run took it over
            wandb.finish()
        if notices is not None:
            notices.close()  # and Ray's printer is restored
            if notices.summary():
                print(notices.summary())
