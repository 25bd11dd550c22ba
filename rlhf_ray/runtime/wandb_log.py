"""Weights & Biases beside metrics.jsonl and TensorBoard (``--logging.wandb PROJECT``).

Optional: ``pip install rlhf_ray[wandb]``. Every record that goes to metrics.jsonl and eval.jsonl
is logged to one W&B run (name: ``logging.wandb_name``, default the run directory's name) with
``iteration`` as the x axis of every chart, so iterations redone after a recovery land on their
own iteration. Offline: ``WANDB_MODE=offline`` writes the run under ``WANDB_DIR`` (default
``<run_dir>/wandb``) for a later ``wandb sync``; nothing goes over the network.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

from rlhf_ray.config import LoggingConfig

INSTALL_HINT = "pip install 'rlhf_ray[wandb]' (or pip install wandb)"


def require_wandb(logging: LoggingConfig, import_module: Callable = importlib.import_module):
    """The wandb module when ``logging.wandb`` is set (None when it is not); a clear ImportError
    when it is set and wandb is missing, raised before Ray starts."""
    if not logging.wandb:
        return None
    try:
        wandb = import_module("wandb")
    except ImportError as exc:
        raise ImportError(f"--logging.wandb {logging.wandb!r} is set but wandb is not installed: {INSTALL_HINT}, "
                          "or unset --logging.wandb") from exc
    return wandb


class WandbRun:
    """One W&B run for a PPO run; ``log`` takes a record's finite numbers."""

    def __init__(self, logging: LoggingConfig, run_dir: str, config: dict, resume: bool = False) -> None:
        wandb = require_wandb(logging)
        assert wandb is not None, "WandbRun needs --logging.wandb"
        name = logging.wandb_name or os.path.basename(os.path.normpath(run_dir))
        directory = os.environ.get("WANDB_DIR") or run_dir
        os.makedirs(directory, exist_ok=True)
        # console="off": W&B would otherwise wrap stdout/stderr (our progress output and its
        # tty detection); id=name so a resumed run (same run directory) continues the same W&B run.
        try:
            self.run = wandb.init(project=logging.wandb, name=name, id=_run_id(name), dir=directory, config=config,
                                  resume="allow" if resume else None,
                                  settings=wandb.Settings(console="off", quiet=True))
        except Exception as exc:  # no login, no network, unknown entity: one message, before Ray starts
            raise ValueError(f"W&B could not start a run in project {logging.wandb!r} (--logging.wandb): {exc}. "
                             "Log in (`wandb login` or WANDB_API_KEY), set WANDB_MODE=offline to write the run "
                             "locally, or unset --logging.wandb.") from exc
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")

    @property
    def where(self) -> str:
        """The run's URL online, its directory offline."""
        offline = self.run.settings.mode in ("offline", "dryrun")
        return self.run.dir if offline else (self.run.url or self.run.dir)

    def log(self, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars))

    def finish(self) -> None:
        self.run.finish()


def _run_id(name: str) -> str:
    """W&B run ids allow letters, digits, '-' and '_' (at most 128 characters)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:128]
