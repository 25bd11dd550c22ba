"""What a run tells the user beside metrics.jsonl: rollout dumps, plain progress lines when
there is no terminal, the W&B mirror (offline), and the names and addresses printed at start.
Driven over the loop tests' in-process fakes (no Ray)."""

from __future__ import annotations

import glob
import io
import json
import math
import struct

import pytest

from rlhf_ray.algorithms import kl_estimate
from rlhf_ray.coordinator.preflight import Inputs
from rlhf_ray.coordinator.rollout_dump import dump_path
from rlhf_ray.coordinator.run import Run
from rlhf_ray.runtime.cluster import banner, metrics_urls, namespace_for
from rlhf_ray.runtime.metrics import EXPORTED_PREFIX, exported_name, gauge_name
from rlhf_ray.runtime.wandb_log import WandbRun, require_wandb
from tests.unit.test_coordinator import EOS, PAD, _config, _coordinator, _prompts
from tests.unit.test_run import CharTokenizer, CheckpointingLearners, FakeRoles


def _run(tmp_path, iterations: int = 4, say=None, ppo: dict | None = None, **logging) -> Run:
    cfg = _config(ppo={"iterations": iterations, **(ppo or {})},
                  logging={"tensorboard": False, "progress_bar": False, "log_every": 2, **logging})
    learners = CheckpointingLearners()
    coord = _coordinator(cfg, learners=learners)
    inputs = Inputs(_prompts(), PAD, [EOS], CharTokenizer(), None)
    wandb = WandbRun(cfg.logging, str(tmp_path), {"name": cfg.name}) if cfg.logging.wandb else None
    return Run(cfg, str(tmp_path), inputs, FakeRoles(learners), coord, say=say or (lambda line: None), wandb=wandb)


def _rows(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _record_batches(run: Run) -> dict[int, object]:
    """The batch of each iteration, as the coordinator leaves it after the step."""
    batches, step = {}, run.coord.step

    def recording_step():
        metrics = step()
        batches[int(metrics["iteration"])] = run.coord.last_batch
        return metrics

    run.coord.step = recording_step
    return batches


# ---------------------------------------------------------------------------------- rollout dumps
def test_rollout_dumps_hold_every_sample_of_every_nth_iteration(tmp_path):
    run = _run(tmp_path, iterations=5, dump_rollouts_every=2)
    batches = _record_batches(run)
    run.iterate()
    run.finish()
    dumped = sorted(glob.glob(str(tmp_path / "rollouts" / "*.jsonl")))
    assert dumped == [dump_path(str(tmp_path), i) for i in (0, 2, 4)]
    metrics = {r["iteration"]: r for r in _rows(tmp_path / "metrics.jsonl")}
    tok = CharTokenizer()
    for it in (0, 2, 4):
        rows, batch = _rows(dump_path(str(tmp_path), it)), batches[it]
        assert len(rows) == len(batch) and [r["sample"] for r in rows] == list(range(len(batch)))
        P = batch.prompt_len
        for i, row in enumerate(rows):
            mask = batch.attention_mask[i, P:]
            assert row["iteration"] == it and row["group"] == int(batch.prompt_index[i])
            assert row["prompt"] == tok.decode(batch.input_ids[i, :P][batch.attention_mask[i, :P]].tolist())
            assert row["response"] == tok.decode(batch.input_ids[i, P:][mask].tolist())
            assert row["reward"] == pytest.approx(float(batch.scores[i]))
            # the per-sample KL is the sum over the sample's response tokens of the configured estimator
            k1 = float(((batch.old_logprobs[i] - batch.ref_logprobs[i]) * mask).sum())
            assert row["kl"] == pytest.approx(k1, abs=1e-6)
            adv = batch.advantages[i][mask]
            assert row["advantages"] == pytest.approx(adv.tolist(), abs=1e-5)
            assert row["advantage"] == pytest.approx(float(adv.mean()), abs=1e-6)
            assert row["response_tokens"] == int(mask.sum())
            assert row["finish_reason"] == ("length" if bool(batch.truncated[i]) else "stop")
            assert row["quarantined"] is False
        # the dump's numbers are the ones metrics.jsonl summarises
        assert sum(r["reward"] for r in rows) / len(rows) == pytest.approx(metrics[it]["reward_mean"], abs=1e-6)
        assert sum(r["kl"] for r in rows) / len(rows) == pytest.approx(metrics[it]["kl_mean"], abs=1e-6)


def test_rollout_dumps_are_off_by_default(tmp_path):
    run = _run(tmp_path, iterations=2)
    run.iterate()
    run.finish()
    assert not (tmp_path / "rollouts").exists()


def test_rollout_kl_uses_the_configured_estimator(tmp_path):
    run = _run(tmp_path, iterations=1, ppo={"kl_in": "loss", "kl_estimator": "k2"}, dump_rollouts_every=1)
    batches = _record_batches(run)
    run.iterate()
    run.finish()
    batch, rows = batches[0], _rows(dump_path(str(tmp_path), 0))
    mask = batch.attention_mask[:, batch.prompt_len:]
    k2 = (kl_estimate(batch.old_logprobs, batch.ref_logprobs, "k2") * mask).sum(-1)
    assert [r["kl"] for r in rows] == pytest.approx(k2.tolist(), abs=1e-6)


# ---------------------------------------------------------------------------------- progress
class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_without_a_terminal_progress_is_plain_periodic_lines_not_bar_frames(tmp_path, capsys):
    said: list[str] = []
    run = _run(tmp_path, iterations=6, say=said.append, progress_bar=True, log_every=2)
    run.stop.install = lambda: None  # leave the test process's signal handlers alone
    stream = _Stream(tty=False)
    run.stream = stream
    run.execute()
    captured = capsys.readouterr()
    assert "\r" not in stream.getvalue() + captured.err + captured.out
    progress = [line for line in said if line.startswith("it ")]
    assert len(progress) == 3  # iterations 0, 2, 4: every logging.log_every
    assert "[1/6 " in progress[0] and "[5/6 " in progress[-1] and "left]" in progress[-1]


def test_on_a_terminal_the_bar_draws_and_lines_carry_no_progress_suffix(tmp_path):
    said: list[str] = []
    run = _run(tmp_path, iterations=4, say=said.append, progress_bar=True, log_every=2)
    run.stop.install = lambda: None
    stream = _Stream(tty=True)
    run.stream = stream
    run.execute()
    assert "4/4" in stream.getvalue() and "\r" in stream.getvalue()
    assert not any("left]" in line for line in said)


# ---------------------------------------------------------------------------------- W&B
def _wandb_history(wandb_dir) -> list[dict]:
    """History rows of an offline W&B run, read from its run-*.wandb file (a LevelDB-style log of
    protobuf records: 7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, parts, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_same_numbers_as_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb_dir"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _run(tmp_path / "run", iterations=3, wandb="rlhf-ray-test")
    run.iterate()
    run.finish()
    expected = [{k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(v)} for r in _rows(tmp_path / "run" / "metrics.jsonl")]
    history = [{k: v for k, v in r.items() if not k.startswith("_")} for r in _wandb_history(wandb_dir)]
    assert len(history) == len(expected) == 3
    for got, want in zip(history, expected):
        assert got.keys() == want.keys()
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_wandb_set_without_wandb_installed_says_how_to_install_it():
    cfg = _config(logging={"wandb": "proj"})

    def missing(name):
        raise ImportError(f"No module named {name!r}")

    with pytest.raises(ImportError, match=r"pip install 'rlhf_ray\[wandb\]'"):
        require_wandb(cfg.logging, import_module=missing)
    assert require_wandb(_config().logging, import_module=missing) is None  # unset: never imported


# ---------------------------------------------------------------------------------- names and addresses
def test_printed_metric_names_are_the_ones_prometheus_shows():
    # Ray 2.60 exports a custom metric created as "rlhf_x" as "ray_rlhf_x" (checked against a
    # live endpoint when this was written; the README's monitoring section shows the scrape).
    assert gauge_name("time/generate") == "rlhf_time_generate"
    assert exported_name("time/generate") == "ray_rlhf_time_generate" == EXPORTED_PREFIX + "time_generate"
    local, remote = metrics_urls("10.1.2.3", 44321)
    text = banner({"dashboard": "http://127.0.0.1:8265", "metrics": local, "metrics_other_machines": remote,
                   "metric_prefix": EXPORTED_PREFIX, "namespace": "rlhf_ray-demo", "gcs_address": "10.1.2.3:6379"})
    assert "(ray_rlhf_*)" in text and "rlhf_*)" not in text.replace("ray_rlhf_*)", "")
    assert "http://127.0.0.1:44321/metrics" in text and "http://10.1.2.3:44321/metrics" in text
    assert ("ray.init(address='10.1.2.3:6379', namespace='rlhf_ray-demo'); ray.util.list_named_actors(), "
            "then ray.get_actor(name)") in text


def test_namespace_is_per_run_from_the_run_directory():
    assert namespace_for("rlhf_ray-{run}", "/x/runs/demo_cpu-20261127-101500/") == "rlhf_ray-demo_cpu-20261127-101500"
    assert namespace_for("fixed", "/x/runs/a") == "fixed"
    assert metrics_urls("10.0.0.1", None) == (None, None)


def test_startup_clock_counts_from_the_launchers_start_and_saves_each_phase(tmp_path):
    import time

    from rlhf_ray.coordinator.startup import StartupClock

    clock = StartupClock(started_at=time.perf_counter() - 5.0)  # the launcher started 5 s ago
    clock.lap("ray")
    clock.save(str(tmp_path / "startup.json"))
    saved = json.loads((tmp_path / "startup.json").read_text())
    assert list(clock.phases) == ["imports", "ray"] and clock.phases["imports"] == pytest.approx(5.0, abs=0.5)
    assert saved["total_s"] == pytest.approx(sum(clock.phases.values())) and saved["imports_s"] >= 4.5
    assert clock.line().startswith("start-up 5.") and "imports 5." in clock.line()
