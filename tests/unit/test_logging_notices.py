"""The quieter terminal (``rlhf_ray.runtime.quiet``): known non-actionable library notices
from the actors go to <run_dir>/library_notices.log, everything else is printed as before."""

from __future__ import annotations

from rlhf_ray.runtime.quiet import NOTICES, LineFilter, NoticeLog, notice_name, wrap_printer

# Lines as the demo's actors print them (Ray's prefix is added later, by its printer).
NOISE = {
    "deepspeed accelerator detection": "[2026-11-27 17:31:04,076] [WARNING] [real_accelerator.py:213:get_accelerator] "
                                       "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable "
                                       "to detect it.",
    "thread binding": "(MainProcess pid=27241) WARNING 11-27 17:31:31 [cpu_worker.py:140] CPU backend doesn't allow to "
                      "use `torch.set_num_threads` after the thread binding, skip it.",
    "deprecations inside dependencies": "/work/main/.venv/lib/python3.11/site-packages/torch/distributed/c10d_logger.py:83:"
                                        " FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated.",
    "weight loading bars": "Loading weights: 100%|##########| 21/21 [00:00<00:00, 19726.85it/s]",
    "LD_PRELOAD allocator hints": "(MainProcess pid=27241) WARNING 11-27 17:31:13 [cpu_worker.py:114] libtcmalloc is not "
                                  "found in LD_PRELOAD. For best performance, please follow the section",
}
# Lines that matter and must reach the terminal.
SIGNAL = [
    "Traceback (most recent call last):",
    "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "/work/main/rlhf_ray/workers/learner.py:88: UserWarning: the value head's gradient is not finite",
    "/work/main/.venv/lib/python3.11/site-packages/torch/nn/modules/module.py:1: UserWarning: something to act on",
    "(MainProcess pid=1) WARNING 11-27 17:31:13 [scheduler.py:1] Sequence group 0 is preempted by PreemptionMode.RECOMPUTE",
    "reward function returned NaN for 3 samples",
]


def test_each_known_notice_is_recognised_by_its_name():
    for name, line in NOISE.items():
        assert notice_name(line) == name, line
    assert {name for name, _, _ in NOTICES} >= set(NOISE)


def test_lines_that_matter_are_never_filtered():
    shown, filtered = LineFilter().split(SIGNAL, "learner-0")
    assert shown == SIGNAL and filtered == []


def test_a_filtered_warning_takes_its_echoed_source_line_with_it_but_nothing_else():
    lines = [NOISE["deprecations inside dependencies"], "  return func(*args, **kwargs)", "  indented output of ours"]
    shown, filtered = LineFilter().split(lines, "learner-0")
    assert shown == ["  indented output of ours"]
    assert [line for _, line in filtered] == lines[:2]


def test_the_ray_printer_gets_only_the_lines_to_show_and_the_log_file_the_rest(tmp_path):
    printed: list[dict] = []
    log = NoticeLog(str(tmp_path / "library_notices.log"))
    handler = wrap_printer(printed.append, log)
    handler({"lines": [NOISE["thread binding"], SIGNAL[1]], "pid": 7, "actor_name": "RolloutEngine", "is_err": False})
    handler({"lines": [NOISE["weight loading bars"], ""], "pid": 8, "actor_name": "ReferenceModel", "is_err": True})
    log.close()
    assert printed == [{"lines": [SIGNAL[1]], "pid": 7, "actor_name": "RolloutEngine", "is_err": False}]
    text = (tmp_path / "library_notices.log").read_text()
    assert "(RolloutEngine pid=7) [thread binding]" in text and "(ReferenceModel pid=8) [weight loading bars]" in text
    assert SIGNAL[1] not in text
    assert "3 library notice line(s) sent to" in log.summary()


def test_rays_autoscaler_stream_passes_through_untouched(tmp_path):
    printed: list[dict] = []
    log = NoticeLog(str(tmp_path / "library_notices.log"))
    data = {"lines": ["", ""], "pid": "autoscaler", "is_err": False}
    wrap_printer(printed.append, log)(data)
    assert printed == [data] and log.summary() is None


def test_install_wraps_rays_printer_and_close_puts_it_back(tmp_path):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from rlhf_ray.runtime.quiet import install

    printed: list[dict] = []
    saved = list(dispatcher.handlers)
    dispatcher.handlers = [("ray_print_logs", printed.append)]
    try:
        log = install(str(tmp_path))
        dispatcher.emit({"lines": [NOISE["thread binding"], SIGNAL[0]], "pid": 3, "is_err": False})
        log.close()
        dispatcher.emit({"lines": [NOISE["thread binding"]], "pid": 3, "is_err": False})
    finally:
        dispatcher.handlers = saved
    assert [d["lines"] for d in printed] == [[SIGNAL[0]], [NOISE["thread binding"]]]
    assert (tmp_path / "library_notices.log").read_text().count("[thread binding]") == 1
