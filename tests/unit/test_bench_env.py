"""The benchmarks' CPU-steal reading: /proc/stat counters in, a share of CPU time out."""

from benchmarks import _env


def test_steal_share_is_stolen_ticks_over_all_ticks():
    # user nice system idle iowait irq softirq steal guest guest_nice
    before = [100, 0, 50, 800, 10, 0, 5, 35, 0, 0]
    after = [160, 0, 70, 860, 10, 0, 5, 95, 0, 0]  # +60 user +20 system +60 idle +60 steal = 200 ticks
    assert _env.steal_share(before, after) == 0.3
    # guest time is already counted in user time: it must not enter the total
    assert _env.steal_share(before, after[:8] + [999, 999]) == 0.3


def test_steal_share_without_counters_is_unknown():
    assert _env.steal_share([], [1] * 10) is None
    assert _env.steal_share([1] * 10, [1] * 10) is None  # no time passed


def test_cpu_times_reads_this_machine():
    times = _env.cpu_times()
    assert len(times) >= 8 and all(t >= 0 for t in times)
