"""A whole run: pre-flight checks, Ray start-up, roles, the PPO loop, metrics and the summary."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

from rlhf_ray.config import Config, config_to_dict
from rlhf_ray.coordinator.metrics import MetricsSink, format_eval_line, format_line
from rlhf_ray.coordinator.pending import RemoteCallError
from rlhf_ray.coordinator.placement import check_fits, placement_plan
from rlhf_ray.data.prompts import PromptSet, load_prompt_texts, split_holdout, tokenize_prompts


@dataclass
class Inputs:
    prompts: PromptSet
    pad_id: int
    eos_ids: list[int]
    tokenizer: object = None
    eval_prompts: PromptSet | None = None  # with eval.every > 0


def eval_prompt_set(cfg: Config, prompts: PromptSet, tokenizer) -> tuple[PromptSet, PromptSet | None]:
    """(training prompts, evaluation prompts): eval.prompts tokenised like data.prompts, or
    eval.holdout prompts held out of the training set; no evaluation set when eval.every is 0."""
    ev = cfg.eval
    if ev.every <= 0:
        return prompts, None
    if ev.prompts is None:
        prompts, held = split_holdout(prompts, ev.holdout, cfg.seed)
    else:
        data = dataclasses.replace(cfg.data, prompts=ev.prompts)
        held = tokenize_prompts(load_prompt_texts(data, cfg.seed), tokenizer, data.max_prompt_tokens, data.too_long)
    k = min(ev.max_prompts, len(held.token_ids))
    return prompts, PromptSet(held.texts[:k], held.token_ids[:k], held.dropped, held.truncated)


def sample_lines(batch, tokenizer, k: int) -> list[str]:
    """The first ``k`` prompt/response pairs of a batch as text, for the terminal."""
    lines = []
    P = batch.prompt_len
    for i in range(min(k, len(batch))):
        mask = batch.attention_mask[i]
        prompt = tokenizer.decode(batch.input_ids[i, :P][mask[:P]].tolist(), skip_special_tokens=True)
        response = tokenizer.decode(batch.input_ids[i, P:][mask[P:]].tolist(), skip_special_tokens=True)
        score = float(batch.scores[i]) if batch.scores is not None else float("nan")
        lines.append(f"  sample: {prompt!r} -> {response!r} (score {score:.3f})")
    return lines


def _check_model_dir(path: str, what: str, flag: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what} {path!r} is not a Hugging Face checkpoint (no config.json); "
                                f"point {flag} at a saved model directory.")


def probe_reward_function(spec: str, prompts: list[str], timeout_s: float) -> None:
    """Load the reward function and call it once on real prompts with two made-up responses, so
    that a function that cannot be imported, raises, hangs, or returns the wrong number of scores
    fails here, before any actor starts."""
    import threading

    from rlhf_ray.rewards import load_reward_function

    fn = load_reward_function(spec)
    prompts = (prompts * 2)[:2]
    result: dict = {}

    def call() -> None:
        try:
            result["scores"] = list(fn(prompts, ["", "42"]))
        except Exception as exc:  # reported below, in the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=call, daemon=True, name="reward-probe")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"reward function {spec} did not return within {timeout_s:.0f} s on a probe call with two "
                           "responses (--resources.call_timeout_s); it hangs or is far too slow.")
    if "error" in result:
        exc = result["error"]
        raise ValueError(f"reward function {spec} raised {type(exc).__name__} on a probe call with two responses "
                         f"(an empty one and '42'): {exc}. It must handle any response text.") from exc
    scores = result["scores"]
    if len(scores) != 2:
        raise ValueError(f"reward function {spec} returned {len(scores)} scores for 2 responses on a probe call; "
                         "it must return one float per response.")
    try:
        [float(x) for x in scores]
    except (TypeError, ValueError):
        raise ValueError(f"reward function {spec} returned {scores!r} on a probe call; scores must be numbers.") from None


def prepare_inputs(cfg: Config) -> Inputs:
    """Everything that can be checked before Ray starts: models exist (building tiny ones if
    asked), the tokenizer has pad/EOS, the reward function loads, prompts tokenize."""
    from transformers import AutoTokenizer

    if cfg.model.build_tiny and not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        from rlhf_ray.tiny_models import ensure_tiny_model

        ensure_tiny_model(cfg.model.path, arch=cfg.model.build_tiny, seed=cfg.seed)
    _check_model_dir(cfg.model.path, "policy model", "--model.path")
    if cfg.reference.path:
        _check_model_dir(cfg.reference.path, "reference model", "--reference.path")
    if cfg.reward.kind == "model":
        _check_model_dir(cfg.reward.model_path or "", "reward model", "--reward.model_path")
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer at {cfg.model.path!r} has no EOS token; responses could never end. "
                         "Set eos_token in its tokenizer_config.json.")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts = load_prompt_texts(cfg.data, cfg.seed)
    prompts = tokenize_prompts(texts, tok, cfg.data.max_prompt_tokens, cfg.data.too_long)
    prompts, eval_prompts = eval_prompt_set(cfg, prompts, tok)
    if cfg.reward.kind == "function":
        probe_reward_function(cfg.reward.function or "", prompts.texts[:2], cfg.resources.call_timeout_s)
    elif cfg.reward.kind == "http":
        from rlhf_ray.reward_server import post_scores

        post_scores(cfg.reward.url or "", (prompts.texts * 2)[:2], ["", "42"], cfg.reward.http_timeout_s,
                    cfg.reward.http_retries)  # an endpoint that is down fails here, before Ray starts
    if len(prompts.token_ids) < cfg.rollout.prompts_per_iteration:
        held = f" (after holding out {cfg.eval.holdout} for evaluation)" if cfg.eval.every and not cfg.eval.prompts else ""
        raise ValueError(f"only {len(prompts.token_ids)} usable prompts{held} but --rollout.prompts_per_iteration is "
                         f"{cfg.rollout.prompts_per_iteration}; add prompts or lower it.")
    return Inputs(prompts, int(pad_id), [int(tok.eos_token_id), *cfg.rollout.stop_token_ids], tok, eval_prompts)


def start_ray(address: str | None) -> dict:
    """Attach to ``address`` or start a local cluster whose dashboard listens on 127.0.0.1 only.
    Returns where to watch: the dashboard URL and this node's Prometheus metrics endpoint."""
    import ray

    if not ray.is_initialized():
        env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        else:
            # The dashboard (an HTTP API that can submit jobs) listens on loopback only.
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=env,
                     log_to_driver=True)
    ctx = ray.get_runtime_context()
    node = next((n for n in ray.nodes() if n["NodeID"] == ctx.get_node_id()), {})
    where = {"dashboard": None, "metrics": None}
    try:
        from ray._private.worker import global_worker

        url = global_worker.node.address_info.get("webui_url")
        where["dashboard"] = f"http://{url}" if url else None
    except Exception:  # attached clients may not know the dashboard address
        pass
    if node.get("MetricsExportPort"):
        where["metrics"] = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    print(f"Ray dashboard: {where['dashboard'] or 'not available'}; Prometheus metrics (rlhf_*): "
          f"{where['metrics'] or 'not available'}")
    return where


def summarize(history: list[dict], head: int = 5) -> dict:
    """Mean reward and KL over the first and last ``head`` iterations."""
    if not history:
        return {"iterations": 0}
    first, last = history[:head], history[-head:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    return {"iterations": len(history), "reward_start": mean(first, "reward_mean"),
            "reward_end": mean(last, "reward_mean"), "kl_start": mean(first, "kl_mean"),
            "kl_end": mean(last, "kl_mean"),
            "seconds_per_iteration": mean(history, "time/iteration")}


class Recovery:
    """What to do when a role fails mid-run.

    * A rollout engine, the reference or the reward actor that died or hung is replaced in its
      placement bundle (an engine also gets the current weights) and the iteration is redone
      with the same prompts: the coordinator rolled its state back, so no sample is lost or
      counted twice.
    * A learner rank that died or hung takes the whole group down with it (its collectives
      cannot continue): the group is restarted and reloaded from the last complete checkpoint
      (or from the initial model if there is none), and the iterations since are redone.
    * A role that raised an error (bad reward function, bad data) is not retried: the same
      input would fail again. Restarts are bounded by resources.max_actor_restarts and
      resources.max_learner_restarts."""

    def __init__(self, cfg: Config, roles, coord, run_dir: str, initial_state: dict, say) -> None:
        self.cfg, self.roles, self.coord, self.run_dir = cfg, roles, coord, run_dir
        self.initial_state, self.say = initial_state, say
        self.actor_restarts = self.learner_restarts = 0

    def counters(self) -> dict[str, float]:
        return {"faults/actor_restarts": float(self.actor_restarts),
                "faults/learner_restarts": float(self.learner_restarts)}

    def handle(self, exc: RemoteCallError) -> int:
        """Recover from ``exc``; returns the iteration the run continues from."""
        from rlhf_ray.coordinator import checkpoint as ckpt
        from rlhf_ray.coordinator.pending import describe

        role = exc.source[0]
        if exc.kind == "error":
            raise exc
        res = self.cfg.resources
        if role != "learner":
            if self.actor_restarts >= res.max_actor_restarts:
                raise RuntimeError(f"giving up after {self.actor_restarts} actor replacements "
                                   f"(--resources.max_actor_restarts): {exc}") from exc
            self.actor_restarts += 1
            self.say(f"{describe(exc.source)} {exc.kind} (phase {exc.phase}); replacing it and redoing "
                     f"iteration {self.coord.iteration}")
            self.roles.replace(exc.source)
            self.coord.mark_weights_stale()
            return self.coord.iteration
        if self.learner_restarts >= res.max_learner_restarts:
            raise RuntimeError(f"giving up after {self.learner_restarts} learner-group restarts "
                               f"(--resources.max_learner_restarts): {exc}") from exc
        self.learner_restarts += 1
        found = ckpt.complete_checkpoints(self.run_dir)
        self.say(f"{describe(exc.source)} {exc.kind} (phase {exc.phase}); restarting the learner group from "
                 f"{found[-1] if found else 'the initial model (no checkpoint yet)'}")
        self.roles.restart_learners()
        if found:
            self.roles.learners.load_checkpoint(found[-1]).result()
            self.coord.load_state_dict(ckpt.load_coordinator_state(found[-1]))
        else:
            self.coord.load_state_dict(self.initial_state)
        self.coord.mark_weights_stale()
        return self.coord.iteration


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


def run(cfg: Config, run_dir: str, ray_address: str | None = None, resume: str | None = None) -> dict:
    """Run PPO to ``ppo.iterations``; returns the summary (also written to <run_dir>/summary.json).

    ``resume``: a checkpoint, a run directory, or "auto" (see ``checkpoint.resolve_resume``);
    the run then continues in the checkpoint's run directory."""
    import ray
    from tqdm import tqdm

    from rlhf_ray.coordinator import checkpoint as ckpt
    from rlhf_ray.coordinator.groups import Roles
    from rlhf_ray.coordinator.loop import PPOCoordinator
    from rlhf_ray.coordinator.plot import write_plot

    inputs = prepare_inputs(cfg)
    resume_from = ckpt.resolve_resume(resume, cfg) if resume else None
    if resume_from:
        run_dir = ckpt.run_dir_of(resume_from)
    os.makedirs(run_dir, exist_ok=True)
    print(f"run directory: {os.path.abspath(run_dir)}")
    with open(os.path.join(run_dir, "config.json"), "w") as fh:
        json.dump(config_to_dict(cfg), fh, indent=2)
    with open(os.path.join(run_dir, "ray.json"), "w") as fh:
        json.dump(start_ray(ray_address), fh)
    check_fits(placement_plan(cfg), ray.cluster_resources())
    t0 = time.perf_counter()
    roles = Roles(cfg)
    print(f"roles up in {time.perf_counter() - t0:.1f} s: {cfg.rollout.num_engines} rollout engine(s), reference, "
          f"reward, {cfg.learner.num_ranks} learner rank(s) (ZeRO-{cfg.learner.zero_stage})")
    with open(os.path.join(run_dir, "placement.json"), "w") as fh:
        json.dump(roles.placement, fh, indent=2)
    coord = PPOCoordinator(cfg, inputs.prompts, inputs.pad_id, inputs.eos_ids, roles.rollout, roles.reference,
                           roles.reward, roles.learners, roles.weight_sync, put=ray.put,
                           eval_prompts=inputs.eval_prompts)
    initial_state = coord.state_dict()
    if resume_from:
        roles.learners.load_checkpoint(resume_from).result()
        coord.load_state_dict(ckpt.load_coordinator_state(resume_from))
        coord.mark_weights_stale()  # engines start from the checkpoint's policy, not model.path
        print(f"resumed from {resume_from} at iteration {coord.iteration}")
    sink = MetricsSink(run_dir, tensorboard=cfg.logging.tensorboard)
    eval_sink = (MetricsSink(run_dir, tensorboard=cfg.logging.tensorboard, filename="eval.jsonl")
                 if inputs.eval_prompts is not None else None)
    history: list[dict] = []
    eval_history: list[dict] = []
    evaluated_at = -1
    stop = StopFlag()
    stop.install()
    bar = tqdm(total=cfg.ppo.iterations, initial=coord.iteration, disable=not cfg.logging.progress_bar,
               dynamic_ncols=True)
    completed, saved_at = False, coord.iteration if resume_from else -1

    def save() -> None:
        nonlocal saved_at
        if saved_at != coord.iteration:
            path = ckpt.save_checkpoint(run_dir, coord.iteration, coord.state_dict(), cfg, roles.learners,
                                        cfg.model.path)
            saved_at = coord.iteration
            bar.write(f"checkpoint: {path}")

    recovery = Recovery(cfg, roles, coord, run_dir, initial_state, bar.write)

    def forget_from(iteration: int) -> None:
        """Iterations ``iteration`` and later run (again): drop their records and evaluations."""
        nonlocal evaluated_at
        sink.truncate_from(iteration)
        history[:] = [h for h in history if h["iteration"] < iteration]
        if eval_sink is not None:
            eval_sink.truncate_from(iteration)
            eval_history[:] = [h for h in eval_history if h["iteration"] < iteration]
            evaluated_at = min(evaluated_at, iteration - 1)

    if resume_from:  # a run that crashed after its last checkpoint logged iterations that run again
        forget_from(coord.iteration)

    def recover(exc: RemoteCallError) -> None:
        redo_from = recovery.handle(exc)  # raises when the fault is not recoverable
        forget_from(redo_from)
        bar.n = redo_from
        bar.refresh()

    def wants_eval() -> bool:
        """Before the first update, every eval.every iterations, and after the last one."""
        return (eval_sink is not None and not stop.requested and evaluated_at != coord.iteration
                and (coord.iteration % cfg.eval.every == 0 or coord.iteration >= cfg.ppo.iterations))

    try:
        while True:
            try:  # a role may die in an iteration, an evaluation or while a checkpoint is written
                if wants_eval():
                    eval_metrics, eval_batch = coord.evaluate()
                    evaluated_at = coord.iteration
                    eval_history.append(eval_metrics)
                    eval_sink.write(eval_metrics)
                    bar.write(format_eval_line(eval_metrics))
                    for line in sample_lines(eval_batch, inputs.tokenizer, cfg.logging.print_samples):
                        bar.write("  eval" + line)
                if coord.iteration >= cfg.ppo.iterations or stop.requested:
                    if cfg.checkpoint.save_on_stop:
                        save()
                    break
                metrics = coord.step()
                metrics.update(recovery.counters())
                history.append(metrics)
                sink.write(metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl_mean']:.3f}",
                                s_it=f"{metrics['time/iteration']:.2f}")
                if metrics["iteration"] % cfg.logging.log_every == 0:
                    bar.write(format_line(metrics))
                    for line in sample_lines(coord.last_batch, inputs.tokenizer, cfg.logging.print_samples):
                        bar.write(line)
                if cfg.checkpoint.every and coord.iteration % cfg.checkpoint.every == 0:
                    save()
            except RemoteCallError as exc:
                recover(exc)
        completed = coord.iteration >= cfg.ppo.iterations
    finally:
        bar.close()
        sink.close()
        summary = {**summarize(history), "completed": completed, "stopped": stop.requested,
                   "final_iteration": coord.iteration, "run_dir": os.path.abspath(run_dir),
                   "placement": roles.placement}
        if eval_sink is not None:
            eval_sink.close()
            if eval_history:
                summary["eval"] = {"first": eval_history[0], "last": eval_history[-1],
                                   "prompts": len(inputs.eval_prompts.token_ids), "temperature": cfg.eval.temperature}
        if os.path.getsize(sink.path) > 0:
            summary["plot"] = write_plot(sink.path, os.path.join(run_dir, "curves.png"),
                                         eval_path=eval_sink.path if eval_sink is not None else None)
        with open(os.path.join(run_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        roles.shutdown()
    print(f"done: {summary['iterations']} iterations, reward {summary.get('reward_start', float('nan')):.3f} -> "
          f"{summary.get('reward_end', float('nan')):.3f}, KL {summary.get('kl_start', float('nan')):.3f} -> "
          f"{summary.get('kl_end', float('nan')):.3f} (means of the first and last 5 iterations); "
          f"plot: {summary.get('plot', 'none')}")
    if "eval" in summary:
        ev = summary["eval"]
        print(f"held-out evaluation ({ev['prompts']} prompts, temperature {ev['temperature']}): reward "
              f"{ev['first']['eval/reward_mean']:.3f} after {ev['first']['iteration']} iterations -> "
              f"{ev['last']['eval/reward_mean']:.3f} after {ev['last']['iteration']}")
    return summary
