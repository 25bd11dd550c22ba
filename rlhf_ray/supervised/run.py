"""Driver side of the SFT and reward-model stages, shared by ``train_sft``, ``train_rm`` and the
pipeline: the CLI generated from a config tree, the trainer ranks as one group in a placement
group, and the epoch loop (evaluate, train, evaluate, ..., save) with metrics.

Per epoch one row goes to ``<train.output_dir>/metrics.jsonl`` (and TensorBoard if asked) and one
line to the terminal; row 0 is the evaluation before any training. At the end the model is saved
as a Hugging Face checkpoint in ``train.output_dir`` with ``train_summary.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from rlhf_ray.backends.engine import engine_label
from rlhf_ray.checkpoint_files import checkpoints_dir, complete_checkpoints
from rlhf_ray.config import ConfigError, config_to_dict, fields_help, load_config, parse_overrides, redacted
from rlhf_ray.data.records import DataError
from rlhf_ray.runtime.cluster import base_env, collective_interface
from rlhf_ray.runtime.metrics import MetricsSink, read_records
from rlhf_ray.runtime.pending import RayPending
from rlhf_ray.runtime.placement import (RolePlacement, actor_options, check_fits, create_groups, on_one_node,
                                        role_bundle)


def parse_cli(prog: str, description: str, cls: type, validator: Callable,
              argv: Sequence[str]) -> tuple[argparse.Namespace, Any]:
    """``--config FILE [--section.field VALUE ...] [--dry-run] [--ray-address A]`` for the root
    dataclass ``cls``; the help lists every field with its documentation."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config fields (any of them as --section.field VALUE):\n" + fields_help(cls))
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--ray-address", default=None,
                        help="attach to this Ray cluster (default: RAY_ADDRESS or a new local one)")
    args, rest = parser.parse_known_args(list(argv))
    try:
        cfg = load_config(args.config, parse_overrides(rest), cls=cls, validator=validator)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    return args, cfg


class TrainerGroup:
    """The ranks of one supervised trainer: one placement group (a bundle per rank), actors
    named ``<name>-<role>-<rank>``, and calls that wait with a timeout and name a failing rank."""

    def __init__(self, cfg, actor_cls, role: str) -> None:
        import ray

        self.cfg, self.role = cfg, role
        self.timeout_s = cfg.train.call_timeout_s
        n, res = cfg.learner.num_ranks, cfg.resources
        plan = [RolePlacement(f"{cfg.name}-{role}", n, role_bundle(res), "PACK")]
        check_fits(plan, ray.cluster_resources())
        self.pg = create_groups(plan, cfg.train.placement_timeout_s)[plan[0].role]
        self.actors = [actor_cls.options(**actor_options(self.pg, i, res, f"{cfg.name}-{role}-{i}",
                                                         base_env(res.threads, collective_interface(cfg.train.network_interface)))).remote(cfg, i, n)
                       for i in range(n)]

    def _all(self, what: str, refs: list) -> list:
        sources = [(self.role, i) for i in range(len(self.actors))]
        return RayPending(refs, sources, f"{self.role} {what}", self.timeout_s).result()

    def setup(self, total_steps: int) -> list[dict]:
        import ray

        loopback = on_one_node(self._all("ping", [a.ping.remote() for a in self.actors]))
        addr, port = ray.get(self.actors[0].master_address.remote(loopback), timeout=self.timeout_s)
        return self._all("set-up", [a.setup.remote(addr, port, total_steps) for a in self.actors])

    def set_data(self, train, eval_set) -> None:
        import ray

        train_ref, eval_ref = ray.put(train), ray.put(eval_set)  # one copy in the object store for all ranks
        self._all("data loading", [a.set_data.remote(train_ref, eval_ref) for a in self.actors])

    def train_epoch(self, epoch: int, start_step: int = 0) -> dict[str, float]:
        return self._all(f"epoch {epoch}", [a.train_epoch.remote(epoch, start_step) for a in self.actors])[0]

    def load_state(self, path: str, position: dict) -> None:
        self._all("checkpoint loading", [a.load_state.remote(path, position) for a in self.actors])

    def evaluate(self) -> dict[str, float]:
        return self._all("evaluation", [a.evaluate.remote() for a in self.actors])[0]

    def save(self, out_dir: str, tokenizer_path: str) -> None:
        self._all("save", [a.save.remote(out_dir, tokenizer_path) for a in self.actors])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.pg)


def format_row(row: dict[str, Any], keys: Sequence[str]) -> str:
    parts = [f"epoch {row['epoch']}"]
    parts += [f"{k} {row[k]:.4g}" for k in keys if k in row]
    return "  ".join(parts)


def total_steps(cfg, n_train: int) -> int:
    """Optimiser steps of the whole run: train.epochs x full batches per epoch, or train.max_steps
    if that is fewer (the horizon of the learning-rate schedule)."""
    steps = cfg.train.epochs * (n_train // cfg.train.batch_size)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def resume_point(cfg) -> tuple[str, dict] | None:
    """The newest complete trainer checkpoint under ``<train.output_dir>/checkpoints`` and its
    position in the data, or None. Raises if it was written by an incompatible run."""
    found = complete_checkpoints(cfg.train.output_dir, prefix="step")
    if not found:
        return None
    path = found[-1]
    with open(os.path.join(path, "position.json")) as fh:
        position = json.load(fh)
    now = {"world_size": cfg.learner.num_ranks, "batch_size": cfg.train.batch_size, "seed": cfg.seed,
           "shuffle": cfg.train.shuffle, "backend": cfg.learner.backend}
    then = {"backend": "deepspeed", **position}  # positions from before learner.backend existed
    differ = [f"{k} {then.get(k)!r} then, {v!r} now" for k, v in now.items() if then.get(k) != v]
    if differ:
        raise ConfigError(
            f"cannot resume from {path}: it was written with other settings ({'; '.join(differ)}). The engine "
            "state is split per rank in its backend's format and the data order depends on these. Resume with the same values, or "
            f"start afresh without --train.resume (or move {checkpoints_dir(cfg.train.output_dir)} away).")
    return path, position


def _rows_before(metrics_path: str, epoch: int) -> list[dict]:
    if not os.path.exists(metrics_path):
        return []
    return [r for r in read_records(metrics_path) if r.get("epoch", epoch) < epoch]


def fit(group: TrainerGroup, cfg, tokenizer_path: str, keys: Sequence[str],
        log: Callable[[str], None] = print, resumed: tuple[str, dict] | None = None) -> list[dict]:
    """Evaluate, then train and evaluate every epoch, then save; returns the rows written. Given
    ``resumed`` (``resume_point``), continue from that checkpoint: the rows of the epochs it
    completed are kept."""
    out_dir = cfg.train.output_dir
    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    start_epoch, start_step, history = 0, 0, []
    if resumed:
        path, position = resumed
        group.load_state(path, position)
        start_epoch, start_step = int(position["epoch"]), int(position["next_step"])
        history = _rows_before(metrics_path, start_epoch)
        log(f"resumed from {path}: epoch {start_epoch} from its step {start_step} "
            f"(optimiser step {position['global_step']} in all)")
    sink = MetricsSink(out_dir, tensorboard=cfg.train.tensorboard, ray_metrics=False)
    sink.truncate_from(start_epoch)  # the rows of this run (and, resuming, of the epochs it continues)
    try:
        for epoch in range(start_epoch, cfg.train.epochs + 1):
            row: dict[str, Any] = {"epoch": epoch, "iteration": epoch}
            if epoch > 0:
                row.update(group.train_epoch(epoch, start_step if epoch == start_epoch else 0))
            row.update(group.evaluate())
            history.append(row)
            sink.write(row)
            log(format_row(row, keys))
            if epoch > 0 and cfg.train.max_steps and row["step"] >= cfg.train.max_steps:
                break
    finally:
        sink.close()
    group.save(out_dir, tokenizer_path)
    return history


def _evals(row: dict[str, Any]) -> dict[str, float]:
    return {k[len("eval/"):]: v for k, v in row.items() if k.startswith("eval/")}


def summarize(history: list[dict], out_dir: str, seconds: float) -> dict[str, Any]:
    """First/last training loss and the held-out metrics before and after training."""
    trained = [r for r in history[1:] if r.get("train/steps")]
    return {
        "output_dir": os.path.abspath(out_dir),
        "epochs": len(trained),
        "steps": int(history[-1].get("step", 0)),
        "train_loss_first_step": trained[0]["train/first_step_loss"] if trained else None,
        "train_loss_first_epoch": trained[0]["train/loss"] if trained else None,
        "train_loss_last_epoch": trained[-1]["train/loss"] if trained else None,
        "eval_before": _evals(history[0]),
        "eval_after": _evals(history[-1]),
        "seconds": seconds,
    }


def run_supervised(cfg, actor_cls, role: str, train, eval_set, tokenizer_path: str,
                   keys: Sequence[str], ray_address: str | None = None) -> dict[str, Any]:
    """Start (or attach to) Ray, run the trainer ranks through ``fit``, shut them down; returns
    the summary, also written to ``<train.output_dir>/train_summary.json``."""
    from rlhf_ray.runtime.cluster import start_ray

    resumed = resume_point(cfg) if cfg.train.resume else None  # before Ray: a mismatch fails fast
    if cfg.train.resume and resumed is None:
        print(f"no complete checkpoint under {cfg.train.output_dir}/checkpoints: starting from {cfg.model.path}")
    start_ray(ray_address)
    t0 = time.perf_counter()
    group = TrainerGroup(cfg, actor_cls, role)
    try:
        info = group.setup(total_steps(cfg, len(train)))
        print(f"{role}: {len(info)} rank(s) up ({engine_label(cfg.learner)}, {info[0]['parameters']} parameters) "
              f"in {time.perf_counter() - t0:.1f} s")
        group.set_data(train, eval_set)
        history = fit(group, cfg, tokenizer_path, keys, resumed=resumed)
    finally:
        group.shutdown()
    summary = {"stage": role, **summarize(history, cfg.train.output_dir, time.perf_counter() - t0)}
    with open(os.path.join(cfg.train.output_dir, "train_summary.json"), "w") as fh:
        json.dump({**summary, "config": redacted(config_to_dict(cfg))}, fh, indent=2)
    return summary


# --------------------------------------------------------------------------- pre-flight (before Ray starts)


def prepare_model(cfg) -> None:
    """Build the tiny model if asked and missing; fail if ``model.path`` is no HF checkpoint."""
    path = cfg.model.path
    if cfg.model.build_tiny and not os.path.isfile(os.path.join(path, "config.json")):
        from rlhf_ray.tiny_models import ensure_tiny_model

        ensure_tiny_model(path, arch=cfg.model.build_tiny, seed=cfg.seed)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model {path!r} is not a Hugging Face checkpoint (no config.json); point "
                                "--model.path at a saved model directory (or set --model.build_tiny llama).")


def prepare_demo_data(cfg) -> None:
    """With ``data.demo`` and no ``data.train_path`` yet, write the offline demo set beside it."""
    if cfg.data.demo and not os.path.isfile(cfg.data.train_path):
        from rlhf_ray.data.demo_data import FILES, ensure_demo_data

        if os.path.basename(cfg.data.train_path) not in FILES:
            raise ConfigError(f"--data.demo writes {', '.join(FILES)}; --data.train_path "
                              f"{cfg.data.train_path!r} is none of them.")
        ensure_demo_data(os.path.dirname(cfg.data.train_path) or ".", seed=cfg.seed)


def check_train_size(n_train: int, cfg, what: str) -> None:
    if n_train < cfg.train.batch_size:
        raise DataError(f"only {n_train} training {what} after the length policy, fewer than one optimiser step "
                         f"(--train.batch_size {cfg.train.batch_size}); add data or lower the batch size.")


def cli_main(prog: str, description: str, cls: type, validator: Callable, train: Callable,
             argv: list[str] | None) -> int:
    """The shared ``main`` of ``train_sft`` and ``train_rm``: parse, ``--dry-run``, train; bad
    inputs found before Ray starts exit 2 with the message."""
    args, cfg = parse_cli(prog, description, cls, validator, sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        print(json.dumps(redacted(config_to_dict(cfg)), indent=2))
        print("sizes:", json.dumps(validator(cfg).__dict__))
        return 0
    try:
        train(cfg, args.ray_address or os.environ.get("RAY_ADDRESS"))
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
