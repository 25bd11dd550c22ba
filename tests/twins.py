"""CPU twins of the shipped configs: each file under configs/ (the ones deploy/ runs included), run
in CI with its own options scaled down, and only what needs a GPU or the user's files swapped.

A twin is the config file itself plus dotted overrides of two kinds, kept apart so a test can name
them: ``swapped`` (a GPU, a file only the user has, a compiled kernel: replaced by the CPU
equivalent, each with the reason) and ``scaled`` (sizes, counts and cadences cut to a few seconds
of work, keeping the ratios the config's settings rely on, e.g. a token budget that takes half a
rank's share of the batch keeps taking half). Every other option (ZeRO stage, dtype, token
budgets, packing, transport, estimators, KL, evaluation and checkpoint cadence as "fires during the
run") runs as shipped.

``TWINS`` has one entry per config; ``tests/unit/test_config_twins_table.py`` fails when a config
under configs/ (or named in deploy/) has none. Placeholders in the overrides, filled per test:
``{policy}`` a tiny causal LM, ``{reward_model}`` a tiny reward model, ``{run_dir}`` / ``{out}`` a
fresh output directory, ``{sft_data}`` / ``{pref_data}`` demo JSONL files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEPLOY = CONFIGS.parent / "deploy"


@dataclass(frozen=True)
class Twin:
    entry: str  # "ppo" (rlhf_ray.launch), "sft", "rm" or "pipeline"
    swapped: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (value, why)
    scaled: dict[str, str] = field(default_factory=dict)
    run_by: str | None = None  # a test elsewhere that already runs this twin (test file::function)

    def overrides(self, **places: str) -> dict[str, str]:
        """Every override with the placeholders filled in."""
        both = {**{k: v for k, (v, _) in self.swapped.items()}, **self.scaled}
        return {k: v.format(**places) for k, v in both.items()}

    def describe(self) -> str:
        """What the twin swapped, one line each (for the test's report)."""
        return "\n".join(f"  {k} -> {v}: {why}" for k, (v, why) in self.swapped.items())


_CPU_PPO = {  # the CPU demos: only the outputs move; the model is the same tiny one they build
    "model.path": ("{policy}", "the tiny model the config would build in artifacts/, built once per test session"),
    "model.build_tiny": ("none", "built already"),
    "logging.run_dir": ("{run_dir}", "a test directory instead of runs/"),
}

TWINS: dict[str, Twin] = {
    "gpu_8x.yaml": Twin(
        entry="ppo",
        swapped={
            "model.path": ("{policy}", "a ~1B model under /models is not on a CI machine: the tiny Llama"),
            "reward.model_path": ("{reward_model}", "likewise: a tiny reward model (same tokenizer)"),
            "data.prompts": ("builtin:digits", "the user's prompt file: the built-in prompts"),
            "resources.learner.num_gpus": ("0", "no GPU: the learners run DeepSpeed on the CPU over gloo, not NCCL"),
            "resources.rollout.num_gpus": ("0", "no GPU: vLLM's CPU build"),
            "resources.reference.num_gpus": ("0", "no GPU"),
            "resources.reward.num_gpus": ("0", "no GPU"),
            "resources.learner.num_cpus": ("0.5", "the test cluster has 4 logical CPUs, not 4 per actor"),
            "resources.rollout.num_cpus": ("0.5", "as above"),
            "resources.reference.num_cpus": ("0.25", "as above"),
            "resources.reward.num_cpus": ("0.25", "as above"),
            "resources.learner.threads": ("1", "2 cores for 6 actors"),
            "resources.rollout.threads": ("1", "as above"),
            "resources.reference.threads": ("1", "as above"),
            "resources.reward.threads": ("1", "as above"),
            "rollout.vllm.enforce_eager": ("true", "CUDA graphs need a GPU (the CPU compile path is the demo's twin)"),
            "resources.call_timeout_s": ("240", "a hang fails the test in 4 minutes, not 30"),
            "logging.run_dir": ("{run_dir}", "a test directory instead of /shared/runs"),
        },
        scaled={
            # 4 ranks x 64 samples -> 2 ranks x 16; 4 mini-batches stay (8 samples per step, 4 per rank)
            "learner.num_ranks": "2", "rollout.prompts_per_iteration": "8",
            # 512 + 512 tokens -> 48 + 16 (the longest sequence 1024 -> 64)
            "data.max_prompt_tokens": "48", "rollout.max_new_tokens": "16", "rollout.max_model_len": "128",
            # budgets keep their share: a micro-batch holds a rank's whole step share of full-length
            # sequences (16 of 1024 -> 4 of 64), a no-grad pass half a rank's batch (32 -> 8 of 64),
            # so ranks with shorter responses need fewer passes than others, as on the GPUs
            "learner.micro_batch_tokens": "256", "learner.forward_max_tokens": "512",
            "reward.micro_batch_size": "8", "reference.micro_batch_size": "8",
            "ppo.iterations": "3", "eval.every": "2", "eval.holdout": "8", "checkpoint.every": "2",
            "sync.bucket_mb": "1",  # 256 MB would hold the whole tiny model in one bucket
            "logging.log_every": "1", "logging.progress_bar": "false",
        },
    ),
    "demo_cpu.yaml": Twin(
        entry="ppo", swapped=dict(_CPU_PPO),
        # the engines' logprob check fires on every iteration, not every 10th: this run is also the
        # test that the compiled engine runs the synced weights (tests/integration/test_ppo_system.py)
        scaled={"ppo.iterations": "3", "eval.every": "2", "checkpoint.every": "2", "sync.check_logprobs_every": "1",
                "logging.progress_bar": "false"},
    ),
    "demo_lora_cpu.yaml": Twin(
        entry="ppo", swapped=dict(_CPU_PPO),
        scaled={"ppo.iterations": "3", "eval.every": "2", "checkpoint.every": "2", "logging.progress_bar": "false"},
    ),
    "sft_cpu.yaml": Twin(
        entry="sft",
        swapped={
            "model.path": ("{policy}", "the tiny model the config would build in artifacts/"),
            "model.build_tiny": ("none", "built already"),
            "data.train_path": ("{sft_data}", "the demo data the config would write, written once per test module"),
            "data.demo": ("false", "written already"),
            "train.output_dir": ("{out}", "a test directory instead of artifacts/"),
        },
        scaled={"train.epochs": "1"},
    ),
    "rm_cpu.yaml": Twin(
        entry="rm",
        swapped={
            "model.path": ("{policy}", "the RM starts from sft_cpu's output; the twin from the tiny model"),
            "data.train_path": ("{pref_data}", "the demo data the config would write"),
            "data.demo": ("false", "written already"),
            "train.output_dir": ("{out}", "a test directory instead of artifacts/"),
        },
        scaled={"train.epochs": "1"},
    ),
    "pipeline_cpu.yaml": Twin(
        entry="pipeline",
        run_by="tests/integration/test_train_entrypoints.py::test_pipeline_sft_rm_ppo",
    ),
    "tools_cpu.yaml": Twin(
        entry="pipeline",
        run_by="tests/integration/test_tool_job.py::test_tool_job_sft_then_ppo_on_calculator_episodes",
    ),
}


def shipped_configs() -> list[str]:
    """Every config a user is pointed at: configs/*.yaml and any configs/<name> deploy/ names that
    ships (deploy/README.md's ``configs/my.yaml`` is the user's own, an example)."""
    import re

    names = {p.name for p in CONFIGS.glob("*.yaml")}
    for path in DEPLOY.iterdir():
        if path.is_file():
            named = re.findall(r"configs/([\w.-]+\.yaml)", path.read_text(errors="replace"))
            names.update(n for n in named if (CONFIGS / n).is_file())
    return sorted(names)
