"""Run distributed PPO: ``python -m rlhf_ray.launch --config configs/demo_cpu.yaml [--section.field value ...]``.

Validates the config and the inputs before starting anything, then attaches to a Ray cluster
(``--ray-address`` or ``RAY_ADDRESS``) or starts a local one with its dashboard on 127.0.0.1,
creates the roles (vLLM rollout engines, reference, reward, DeepSpeed learner ranks) in their
placement groups, and runs the PPO loop. It prints the run directory, the dashboard, the
Prometheus endpoint (metrics named ``ray_rlhf_*``), the actors' Ray namespace and the start-up
phases (also in ``<run_dir>/ray.json`` and ``startup.json``). Metrics go to
``<run_dir>/metrics.jsonl``, TensorBoard and, with ``--logging.wandb PROJECT``, Weights & Biases;
``--logging.dump_rollouts_every N`` writes samples to ``<run_dir>/rollouts/``. Without a terminal
the progress bar becomes a plain line every ``logging.log_every`` iterations. The run ends with a
summary of reward and KL at start and end.

Under ``ray job submit --working-dir . -- python -m rlhf_ray.launch ...`` the job runs in Ray's
temporary copy of the working directory, which Ray deletes: a relative ``logging.run_dir`` is
refused there (pass an absolute one). ``--dry-run`` prints the resolved config, the placement
plan and, for a config with GPU roles, the memory plan (``rlhf_ray.backends.memory_plan``), and
exits; a plan that cannot fit the GPU is refused there and by a real launch's pre-flight. Errors
in the inputs (data, reward function, models) and failed runs print one message; ``--debug``
adds the traceback.
Checkpoints: every ``--checkpoint.every`` iterations and on Ctrl-C/SIGTERM; ``--resume PATH|auto``.
"""

from __future__ import annotations

import time

STARTED_AT = time.perf_counter()  # start-up is reported from here (see coordinator.run.StartupClock)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from rlhf_ray.config import (Config, ConfigError, config_to_dict, fields_help, load_config,  # noqa: E402
                             parse_overrides, redacted, resolve)
from rlhf_ray.runtime.placement import placement_plan  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_ray.launch", description="Distributed PPO on Ray, vLLM and DeepSpeed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config fields (any of them as --section.field VALUE):\n" + fields_help(Config))
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print resolved config, placement plan and memory plan, then exit")
    parser.add_argument("--ray-address", default=None, help="attach to this Ray cluster (default: RAY_ADDRESS or a new local one)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its message")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue from a checkpoint, a run directory's latest checkpoint, or auto (newest run of this name)")
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, parse_overrides(rest))
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    return args, cfg


RAY_WORKING_DIR_COPY = os.sep + os.path.join("runtime_resources", "working_dir_files") + os.sep


def run_dir_for(cfg: Config, cwd: str | None = None) -> str:
    """The run directory, absolute. Refused when it would land in the copy of the working
    directory that ``ray job submit --working-dir`` unpacks (Ray deletes it with the cluster)."""
    path = os.path.abspath(os.path.join(cwd or os.getcwd(),
                                        cfg.logging.run_dir.format(name=cfg.name, time=time.strftime("%Y%m%d-%H%M%S"))))
    if RAY_WORKING_DIR_COPY in path:
        raise ConfigError(f"--logging.run_dir {cfg.logging.run_dir!r} resolves to {path}, inside the temporary copy of "
                          "the working directory that Ray made for this job and deletes with the cluster: the run's "
                          "checkpoints and metrics would vanish. Pass an absolute directory that outlives the job, "
                          "e.g. --logging.run_dir /shared/runs/{name}-{time}.")
    return path


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    sizes = resolve(cfg)
    plan = placement_plan(cfg)
    if args.dry_run:
        print(json.dumps(redacted(config_to_dict(cfg)), indent=2))
        print("\nsizes:", json.dumps(sizes.__dict__))
        print("placement plan (one placement group per role):")
        for p in plan:
            print("  " + p.describe())
        from rlhf_ray.backends.memory_plan import dry_run_report

        lines, refused = dry_run_report(cfg)  # no lines for a CPU-only config
        for line in lines:
            print(line)
        if refused is not None:
            return _fail(refused, 2, args.debug)
        return 0
    from rlhf_ray.coordinator.loop import NonFiniteError, SyncMismatchError
    from rlhf_ray.coordinator.recovery import NodeLostError
    from rlhf_ray.coordinator.run import run
    from rlhf_ray.runtime.pending import RemoteCallError
    from rlhf_ray.runtime.placement import PlacementError

    try:
        summary = run(cfg, run_dir_for(cfg), ray_address=args.ray_address or os.environ.get("RAY_ADDRESS"),
                      resume=args.resume, started_at=STARTED_AT)
    except (ValueError, FileNotFoundError, ImportError, TimeoutError) as exc:  # the inputs: before Ray starts
        return _fail(exc, 2, args.debug)
    except PlacementError as exc:  # the roles do not fit the cluster: checked before any actor starts
        return _fail(exc, 2, args.debug)
    except (RemoteCallError, NonFiniteError, SyncMismatchError, NodeLostError) as exc:  # a run that could not go on
        return _fail(exc, 1, args.debug)
    return 0 if summary.get("completed") or summary.get("stopped") else 1


def _fail(exc: BaseException, code: int, debug: bool) -> int:
    """One message (the error says what, why and how to fix); the traceback only with --debug."""
    if debug:
        import traceback

        traceback.print_exception(exc)
    print(f"error: {exc}" + ("" if debug else "\n(run with --debug for the traceback)"), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
