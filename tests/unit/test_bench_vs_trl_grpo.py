"""``benchmarks/vs_trl_grpo.py`` without running it: our config holds ``--tokens`` new tokens
(``rollout.max_model_len`` follows them), a refused setting stops before either side runs, and a
failed run leaves the previous results file alone. Both systems are replaced by stand-ins."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from benchmarks import _env
from benchmarks import vs_trl_grpo as bench


@pytest.fixture()
def model(tmp_path):
    """A model directory as far as the config needs one (the tiny Llama's 512 positions)."""
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    return str(tmp_path)


def test_our_config_holds_the_requested_tokens(model):
    for tokens, room in ((16, 128), (128, 48 + 128), (464, 512)):  # the demo's 128 until the responses need more
        cfg = bench.ours_config(model, SimpleNamespace(tokens=tokens, ranks=2))
        assert (cfg.rollout.max_new_tokens, cfg.rollout.max_model_len, cfg.data.max_prompt_tokens) == (tokens, room, 48)
    with pytest.raises(ValueError, match=r"--tokens 465 .* 512 positions; use --tokens 464 or fewer"):
        bench.ours_config(model, SimpleNamespace(tokens=465, ranks=2))


def _trl_result(*_):
    return {"system": "TRL stand-in", "seconds_per_iteration": 1.0, "samples_per_s": 32.0,
            "response_tokens_per_iteration": 100.0, "reward_curve": [0.1, 0.2], "kl_loss_curve": [0.0, 0.01]}


def _ours_fails(*_):
    raise RuntimeError("engine died")


@pytest.fixture()
def stand_ins(model, monkeypatch):
    """Both systems, the model and the result writers replaced; returns what was called."""
    called: dict[str, list] = {"trl": [], "ours": [], "saved": [], "plotted": []}
    monkeypatch.setattr(_env, "tiny_model", lambda *a, **k: model)
    monkeypatch.setattr(_env, "wait_for_quiet", lambda *a, **k: {})
    monkeypatch.setattr(_env, "save_results", lambda *a, **k: called["saved"].append(a))
    monkeypatch.setattr(bench, "plot", lambda *a, **k: called["plotted"].append(a))
    monkeypatch.setattr(bench, "run_trl", lambda *a: called["trl"].append(a) or _trl_result())
    monkeypatch.setattr(bench, "run_ours", lambda *a: called["ours"].append(a) or _ours_fails())
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(shutdown=lambda: None))
    return called


def _main(monkeypatch, argv: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["vs_trl_grpo", *argv])
    bench.main()


def test_a_failed_run_writes_no_results(stand_ins, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _main(monkeypatch, ["--iters", "2", "--warmup", "0", "--trl-runs", "1", "--tokens", "128"])
    assert exit_.value.code == 1
    assert len(stand_ins["trl"]) == 1 and len(stand_ins["ours"]) == 1  # both ran; ours failed
    assert stand_ins["saved"] == [] and stand_ins["plotted"] == []
    assert "not saved: 1 run(s) failed; benchmarks/results/vs_trl_grpo.json is unchanged" in capsys.readouterr().out


def test_a_refused_setting_stops_before_either_side_runs(stand_ins, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _main(monkeypatch, ["--iters", "2", "--tokens", "600"])
    assert exit_.value.code == 2 and "use --tokens 464 or fewer" in capsys.readouterr().err
    assert stand_ins["trl"] == stand_ins["ours"] == stand_ins["saved"] == []
