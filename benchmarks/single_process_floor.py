"""The single-process floor: the same PPO iteration as one plain loop, no Ray, no vLLM, no DeepSpeed.

What it measures: seconds per PPO iteration (and per phase) of a plain loop that does what one
iteration of our system does, at the same sizes as ``benchmarks.ppo_throughput``, with the same
config (configs/demo_cpu.yaml + the same overrides): HF ``generate`` sampling (temperature 1,
no top-k/top-p, stop at EOS) from ``rlhf_ray.models.ActorCritic``'s policy; the reward function
(``digit_fraction`` on decoded responses); reference logprobs from a frozen copy (micro-batches
of ``reference.micro_batch_size``); old logprobs and values (``learner.forward_batch_size``);
the coordinator's advantage math (``rlhf_ray.algorithms``: k1 KL shaping with the same KL
controller, GAE, whitening); and the update (epochs x mini-batches, one AdamW step per mini-batch,
the same param groups, lr, betas and grad-norm clip as the learner, token-sum losses over the
step's tokens). It packs with ``rlhf_ray.batch.pack_generation`` like the system does.
The difference from our system's time is what the distributed machinery (Ray calls, object
store, vLLM in an actor, DeepSpeed over 2 ranks, weight sync, idle roles) costs on this machine.
If ``benchmarks/results/ppo_throughput.json`` exists, the ratio ours / floor is printed per size.

What it leaves out: weight sync (nothing to sync in one process), rollout logprobs (HF generate
does not give them cheaply; ours only uses them for a metric), metrics logging, start-up.

Threads: ``--threads`` (default 1; 2 = the whole 2-core machine, faster only when nothing else runs:
in a check at load average ~2 it took 7.2 s/it at 32x16 with 2 threads vs 0.38 s/it with 1).

Run (repository root, ~1-2 minutes on 2 cores):
    .venv/bin/python -m benchmarks.single_process_floor
    .venv/bin/python -m benchmarks.single_process_floor --threads 1 --sizes 8x8x32
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from benchmarks import _env
from benchmarks.ppo_throughput import add_size_args, parse_size, size_config

PHASES = ("generate", "score", "advantages", "update")


class FloorPPO:
    """One process holding the policy+value model, the reference, the reward function and the optimiser."""

    def __init__(self, cfg, inputs) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlhf_ray.algorithms import AdaptiveKLController, FixedKLController
        from rlhf_ray.backends.engine import make_torch_optimizer, param_groups
        from rlhf_ray.data.prompts import PromptSampler
        from rlhf_ray.models import ActorCritic
        from rlhf_ray.rewards import load_reward_function

        self.cfg, self.inputs = cfg, inputs
        torch.manual_seed(cfg.seed)
        self.model = ActorCritic.from_pretrained(cfg.model.path, value_head_init_std=cfg.model.value_head_init_std,
                                                 value_grad_to_body=cfg.model.value_grad_to_body)
        self.ref = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).eval().requires_grad_(False)
        self.tok = AutoTokenizer.from_pretrained(cfg.model.path)
        self.reward_fn = load_reward_function(cfg.reward.function)
        self.opt = make_torch_optimizer(param_groups(self.model, cfg.learner), cfg.learner)
        p = cfg.ppo
        self.kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target
                       else FixedKLController(p.kl_coef))
        self.sampler = PromptSampler(len(inputs.prompts.token_ids), cfg.seed, cfg.data.shuffle)
        self.iteration = 0

    # ------------------------------------------------------------------ phases
    @torch.no_grad()
    def generate(self):
        from rlhf_ray.batch import Generation, pack_generation

        r, pad = self.cfg.rollout, self.inputs.pad_id
        idx = self.sampler.next(r.prompts_per_iteration)
        prompts = [self.inputs.prompts.token_ids[i] for i in idx]
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), P), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = 1
        out = self.model.policy.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=r.temperature, top_k=0, top_p=1.0,
            max_new_tokens=r.max_new_tokens, num_return_sequences=r.samples_per_prompt,
            eos_token_id=self.inputs.eos_ids, pad_token_id=pad)
        gen = Generation([], [], [], [], [])
        eos = set(self.inputs.eos_ids)
        for row, seq in enumerate(out[:, P:].tolist()):
            resp = []
            for t in seq:
                resp.append(t)
                if t in eos:
                    break
            k = row // r.samples_per_prompt
            gen.prompt_ids.append(list(prompts[k]))
            gen.response_ids.append(resp)
            gen.logprobs.append([0.0] * len(resp))
            gen.finish_reasons.append("stop" if resp and resp[-1] in eos else "length")
            gen.prompt_index.append(k)
        return pack_generation(gen, pad, self.inputs.eos_ids)

    @torch.no_grad()
    def score(self, batch):
        from rlhf_ray.algorithms import logprobs_from_logits

        temp, R = self.cfg.rollout.temperature, batch.response_mask.shape[1]
        ref_lp, old_lp, old_v = (torch.zeros(len(batch), R) for _ in range(3))
        row = 0
        for mb in batch.chunks(self.cfg.reference.micro_batch_size):
            mb = mb.trim()
            r = mb.response_mask.shape[1]  # the LM head runs over the response positions only, as in the system
            logits = self.ref(input_ids=mb.input_ids, attention_mask=mb.attention_mask.long(),
                              position_ids=mb.position_ids, logits_to_keep=r + 1).logits
            lp = logprobs_from_logits(logits[:, -r - 1:-1], mb.response_ids, temp)
            ref_lp[row: row + len(mb), : lp.shape[1]] = lp * mb.response_mask
            row += len(mb)
        row = 0
        for mb in batch.chunks(self.cfg.learner.forward_batch_size):
            mb = mb.trim()
            out = self.model(mb.input_ids, mb.attention_mask.long(), mb.position_ids,
                             response_len=mb.response_mask.shape[1])
            lp = logprobs_from_logits(out.logits, mb.response_ids, temp)
            v = out.values
            old_lp[row: row + len(mb), : lp.shape[1]] = lp * mb.response_mask
            old_v[row: row + len(mb), : lp.shape[1]] = v * mb.response_mask
            row += len(mb)
        P = batch.prompt_len
        prompts, responses = [], []
        for ids, m in zip(batch.input_ids, batch.attention_mask):
            prompts.append(self.tok.decode(ids[:P][m[:P]].tolist(), skip_special_tokens=True))
            responses.append(self.tok.decode(ids[P:][m[P:]].tolist(), skip_special_tokens=True))
        scores = torch.tensor([float(s) for s in self.reward_fn(prompts, responses)], dtype=torch.float32)
        return batch.replace(ref_logprobs=ref_lp, scores=scores, old_logprobs=old_lp, old_values=old_v)

    def advantages(self, batch):
        from rlhf_ray.algorithms import compute_gae, kl_estimate, masked_whiten, shape_token_rewards

        p, mask = self.cfg.ppo, batch.response_mask
        kl = kl_estimate(batch.old_logprobs, batch.ref_logprobs, p.kl_estimator) * mask
        rewards = shape_token_rewards(batch.scores, kl, mask, self.kl_ctl.value)
        gae = compute_gae(rewards, batch.old_values, mask, p.gamma, p.lam)
        adv = masked_whiten(gae.advantages, mask) if p.whiten_advantages else gae.advantages
        self.kl_ctl.update(float(kl.sum(-1).mean()), len(batch))
        return batch.replace(advantages=adv, returns=gae.returns)

    def update(self, batch) -> None:
        from rlhf_ray.algorithms import logprobs_from_logits
        from rlhf_ray.workers.objective import ppo_objective

        p, lrn, temp = self.cfg.ppo, self.cfg.learner, self.cfg.rollout.temperature
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.iteration * 31)
        # one process holds what the learner ranks hold together: a micro-batch of ranks x micro size
        micro = lrn.micro_batch_size * lrn.num_ranks
        self.model.train()
        for _ in range(p.epochs):
            for mini in batch.select(torch.randperm(len(batch), generator=gen)).split(p.mini_batches):
                step_tokens = float(mini.num_response_tokens())
                step_sequences = float(mini.response_mask.any(-1).sum())
                for mb in mini.chunks(micro):
                    mb = mb.trim()
                    out = self.model(mb.input_ids, mb.attention_mask.long(), mb.position_ids,
                                     response_len=mb.response_mask.shape[1])
                    lp = logprobs_from_logits(out.logits, mb.response_ids, temp)
                    values = out.values.float()
                    # The learner's own loss. The floor computes no entropy (ppo.entropy_coef is 0 in
                    # its configs), so the entropy term gets zeros.
                    ppo_objective(p, mb, lp, values, torch.zeros_like(lp), step_tokens=step_tokens,
                                  step_sequences=step_sequences, kl_coef=self.kl_ctl.value,
                                  max_len=self.cfg.rollout.max_new_tokens).loss.backward()
                if lrn.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), lrn.max_grad_norm)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)

    def step(self) -> dict[str, float]:
        times: dict[str, float] = {}
        t_start = t = time.perf_counter()
        batch = self.generate()
        times["generate"], t = time.perf_counter() - t, time.perf_counter()
        batch = self.score(batch)
        times["score"], t = time.perf_counter() - t, time.perf_counter()
        batch = self.advantages(batch)
        times["advantages"], t = time.perf_counter() - t, time.perf_counter()
        self.update(batch)
        times["update"] = time.perf_counter() - t
        times["iteration"] = time.perf_counter() - t_start
        self.iteration += 1
        return {**times, "samples": len(batch), "response_tokens": float(batch.response_mask.sum()),
                "reward_mean": float(batch.scores.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_args(ap, "single_process_floor")  # the same settings as ppo_throughput (ranks: config only)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from rlhf_ray.coordinator.preflight import prepare_inputs

    threads = _env.set_threads(args.threads)
    quiet = _env.wait_for_quiet(args.quiet_wait)
    model = _env.tiny_model()
    results = []
    for text in args.sizes.split(","):
        size = parse_size(text)
        cfg = size_config(model, *size, args)
        floor = FloorPPO(cfg, prepare_inputs(cfg))
        for _ in range(args.warmup):
            floor.step()
        rows = [floor.step() for _ in range(args.iters)]
        it = _env.mean([r["iteration"] for r in rows])
        results.append({"size": text, "samples": rows[0]["samples"], "max_new_tokens": size[2],
                        "response_tokens": _env.mean([r["response_tokens"] for r in rows]), "iteration_s": it,
                        "iteration_s_std": _env.stdev([r["iteration"] for r in rows]),
                        "samples_per_s": rows[0]["samples"] / it,
                        "tokens_per_s": _env.mean([r["response_tokens"] for r in rows]) / it,
                        "phases_s": {p: _env.mean([r[p] for r in rows]) for p in PHASES}, "iterations": rows})

    ours = {}
    path = _env.RESULTS_DIR / "ppo_throughput.json"
    if path.exists():
        doc = json.loads(path.read_text())
        ours = {f"{s['prompts']}x{s['samples_per_prompt']}x{s['max_new_tokens']}": s for s in doc.get("sizes", [])}
    table = []
    for r in results:
        row: dict[str, Any] = {"samples x tok": f"{int(r['samples'])}x{r['max_new_tokens']}",
                               "resp_tok": r["response_tokens"], "floor s/it": r["iteration_s"],
                               "samples/s": r["samples_per_s"], **r["phases_s"]}
        if r["size"] in ours:
            o = ours[r["size"]]
            r["ours_iteration_s"] = o["iteration_s"]
            r["ours_over_floor"] = o["iteration_s"] / r["iteration_s"]
            row.update({"ours s/it": o["iteration_s"], "ours/floor": r["ours_over_floor"]})
        table.append(row)
    _env.print_table(table, title=f"\nsingle-process floor ({args.threads} threads; means over {args.iters} "
                                  f"iterations after {args.warmup} warm-up; seconds)")
    if ours:
        print(f"(ours from {path.relative_to(_env.ROOT)}, measured {json.loads(path.read_text())['env']['time']})")
    key = {f"{int(r['samples'])}x{r['max_new_tokens']}": {"s_per_it": round(r["iteration_s"], 4),
                                                          **({"ours_over_floor": round(r["ours_over_floor"], 2)}
                                                             if "ours_over_floor" in r else {})} for r in results}
    _env.save_results(args.name, {"args": vars(args), "threads": threads, "load": quiet,
                                  "loadavg_end": _env.loadavg(), "sizes": results}, key)


if __name__ == "__main__":
    main()
