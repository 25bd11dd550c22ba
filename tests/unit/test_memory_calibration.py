"""The learner's memory estimate against the peaks measured on one H100 (``benchmarks.learner_gpu``:
``torch.cuda.max_memory_allocated`` of one rank's PPO update, 0.5B and 1.5B Llama shapes, ZeRO-2
and ZeRO-3, full and LoRA rank 8, bf16, 16k-token micro-batches).

Each row is rebuilt as the config the benchmark ran (``bench_config`` with the row's recorded
settings) and estimated from the model sizes the file records. The estimate less the CUDA context
(outside torch's allocator, so not in the measurement) must be within 15% of the peak; the model
state after set-up (weights, master weights and ZeRO-3's gradient partition) within 1% of the
recorded set-up memory. The plain-torch reference rows are not a learner config and are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.learner_gpu import bench_config
from rlhf_ray.backends.memory import CUDA_CONTEXT, GIB, LORA_MODULES, ModelShape, learner_estimate

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
FILES = ("learner_gpu.json", "learner_gpu_full_rerun.json", "learner_gpu_lora.json")


def measured_rows() -> list[tuple[str, dict, dict, dict]]:
    """(file, row, the row's model sizes, the file's --set overrides) of every learner row."""
    out = []
    for name in FILES:
        data = json.loads((RESULTS / name).read_text())
        sets = dict(item.split("=", 1) for item in data["args"]["set"])
        for row in data["rows"]:
            if "error" in row or row["case"] == "torch":  # failed runs; the plain-torch reference
                continue
            out.append((name, row, data["sizes"][row["size"]], sets))
    return out


def estimate(row: dict, sizes: dict, sets: dict):
    shape = ModelShape(hidden=sizes["hidden_size"], intermediate=sizes["intermediate_size"],
                       layers=sizes["num_hidden_layers"], heads=sizes["num_attention_heads"],
                       kv_heads=sizes["num_attention_heads"],
                       head_dim=sizes["hidden_size"] // sizes["num_attention_heads"], vocab=sizes["vocab_size"])
    recorded = {"learner.micro_batch_tokens": str(row["micro_batch_tokens"]),
                "ppo.mini_batches": str(row["mini_batches"]),
                "model.gradient_checkpointing": str(row["gradient_checkpointing"]).lower(),
                "learner.packing": str(row["packing"]).lower(), "model.dtype": "bfloat16"}
    assert "bfloat16" in row["precision"]
    cfg = bench_config(Path("unused"), int(row["case"].removeprefix("zero")), row["batch"], row["prompt_len"],
                       row["response_len"], {**sets, **recorded})
    return cfg, shape, learner_estimate(cfg, shape)


def test_the_files_hold_the_rows_the_issue_names():
    rows = measured_rows()
    cases = sorted({(r["size"], r["case"], "lora" if "lora" in f else "full") for f, r, _, _ in rows})
    assert cases == [("0.5b", "zero2", "full"), ("0.5b", "zero2", "lora"), ("0.5b", "zero3", "full"),
                     ("1.5b", "zero2", "full"), ("1.5b", "zero2", "lora"), ("1.5b", "zero3", "full")]


@pytest.mark.parametrize("name,row,sizes,sets", measured_rows(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_the_learner_estimate_is_within_15_percent_of_the_h100_peak(name, row, sizes, sets):
    cfg, shape, est = estimate(row, sizes, sets)
    # the parameter count the run reported: the body, the adapters, the value head (H + 1)
    lora = cfg.model.lora.rank
    adapters = shape.lora_params(lora, tuple(t for t in cfg.model.lora.target_modules if t in LORA_MODULES))
    assert shape.params() + (adapters if lora else 0) + shape.hidden + 1 == row["parameters"]
    setup = sum(est.terms.get(k, 0) for k in ("weights", "master weights", "gradients")) / GIB
    assert setup == pytest.approx(row["mem_after_setup_gib"], rel=0.01)
    peak = (est.total - CUDA_CONTEXT) / GIB
    assert peak == pytest.approx(row["peak_mem_gib"], rel=0.15), (
        f"{name} {row['size']} {row['case']}: estimated {peak:.2f} GiB, measured {row['peak_mem_gib']:.2f} GiB; "
        f"terms {({k: round(v / GIB, 2) for k, v in est.terms.items()})}")
