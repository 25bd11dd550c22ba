"""How a policy does on the calculator task, in plain transformers: no Ray, no vLLM, no PPO.

What it measures: for held-out prompts of ``rlhf_ray.data.tool_task`` (``eval_prompts.jsonl``), run
each episode as the tool-use job's rollout does, token in, token out: the policy samples a turn
until EOS or the stop string ``</calc>`` (the tokens that complete it kept), the calculator
environment (``rlhf_ray.envs.calculator.CalculatorEnv``) answers, its observation is tokenised once
(no special tokens) and appended as ids, up to ``--max-turns`` turns. Reported: accuracy (the
reward ``tool_answer_correct`` on the episode's text), the tool-call rate (episodes with a call),
the operand copy accuracy (first call's operands equal the prompt's, among episodes with a call),
the accuracy among episodes that call the tool, turns per episode and tool errors; for sampling at
temperature 1 (full softmax, as the engines sample) and greedy.

What it leaves out: the PPO stage and vLLM (the check of an SFT model before PPO exists for
episodes; the run's own held-out evaluation reports the same numbers).

Run (repository root, ~20 s on 2 cores):
    .venv/bin/python -m benchmarks.tool_policy_check --model artifacts/tools/sft \\
        --prompts artifacts/tools/data/eval_prompts.jsonl --n 200
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rlhf_ray.data.tool_task import outcome  # noqa: E402
from rlhf_ray.envs.calculator import CLOSE, CalculatorEnv  # noqa: E402
from rlhf_ray.rewards import tool_answer_correct  # noqa: E402


def _turn_end(ids: list[int], tokenizer, eos: int, pad: int) -> tuple[list[int], bool]:
    """(the turn's tokens, whether it ended with EOS): up to the first EOS (dropped) or the token
    that completes the stop string (kept), whichever comes first."""
    out = []
    for t in ids:
        if t == eos:
            return out, True
        if t == pad and t != eos:
            break
        out.append(t)
        if tokenizer.decode(out, skip_special_tokens=True).endswith(CLOSE):
            break
    return out, False


@torch.no_grad()
def run_episodes(model, tokenizer, prompts: list[str], sample: bool, max_turns: int = 3,
                 max_new_tokens: int = 24, max_episode_tokens: int = 64) -> list[str]:
    """Each prompt's episode text after the prompt (turns and observations)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    episode: list[list[int]] = [[] for _ in prompts]
    envs = [CalculatorEnv() for _ in prompts]
    for env, p in zip(envs, prompts):
        env.reset({"prompt": p})
    active = list(range(len(prompts)))
    for _ in range(max_turns):
        if not active:
            break
        rows = [prompt_ids[i] + episode[i] for i in active]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        gen = model.generate(input_ids=ids, attention_mask=attn, do_sample=sample, temperature=1.0 if sample else None,
                             top_k=0 if sample else None, top_p=1.0 if sample else None, max_new_tokens=max_new_tokens,
                             stop_strings=[CLOSE], tokenizer=tokenizer, eos_token_id=eos, pad_token_id=pad)
        still = []
        for row, i in enumerate(active):
            turn, ended = _turn_end(gen[row, width:].tolist(), tokenizer, eos, pad)
            episode[i] += turn
            result = envs[i].step(tokenizer.decode(turn, skip_special_tokens=True))
            if ended or result.done:
                continue
            episode[i] += tokenizer(result.observation, add_special_tokens=False)["input_ids"]
            if len(episode[i]) < max_episode_tokens:
                still.append(i)
        active = still
    return [tokenizer.decode(e, skip_special_tokens=True) for e in episode]


def summarise(prompts: list[str], answers: list[int], responses: list[str]) -> dict:
    outs = [outcome(p, r) for p, r in zip(prompts, responses)]
    scores = tool_answer_correct(prompts, responses, answers)
    called = [o for o in outs if o["called"]]
    n = len(responses)
    return {"episodes": n, "accuracy": sum(scores) / n,
            "tool_call_rate": len(called) / n,
            "operand_copy_accuracy": sum(o["copied"] for o in called) / max(1, len(called)),
            "accuracy_when_called": sum(s for s, o in zip(scores, outs) if o["called"]) / max(1, len(called)),
            "calls_per_episode": sum(r.count(CLOSE) for r in responses) / n,
            "tool_errors": sum(r.count(" error.") for r in responses)}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(prog="python -m benchmarks.tool_policy_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face model directory (e.g. the SFT output)")
    parser.add_argument("--prompts", required=True, help="JSONL with prompt and answer fields")
    parser.add_argument("--n", type=int, default=200, help="how many prompts (the first n)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show", type=int, default=6, help="episodes to print per mode")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open(args.prompts) as fh:
        records = [json.loads(line) for line in fh if line.strip()][: args.n]
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    result = {"model": args.model, "prompts": args.prompts}
    for mode, sample in (("sampled_t1", True), ("greedy", False)):
        torch.manual_seed(args.seed)
        responses = run_episodes(model, tokenizer, prompts, sample)
        result[mode] = summarise(prompts, answers, responses)
        print(f"{mode}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in result[mode].items()))
        for p, r in list(zip(prompts, responses))[: args.show]:
            print(f"  {p!r} -> {r!r}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
