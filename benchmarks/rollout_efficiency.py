"""Generate phase through the system vs the same vLLM engine called directly in this process.

What it measures, for each size (prompts x samples per prompt x max new tokens), median over
``--repeats`` after ``--warmup`` calls, the two paths alternating call by call so that load from
other processes hits both alike:
  * system: ``RolloutGroup.generate(...).result()`` on one ``RolloutActor`` (Ray actor, its
    runtime_env as ``Roles`` sets it: 1 thread, in-process vLLM engine) followed by
    ``pack_generation`` in the driver, i.e. the coordinator's generate phase;
  * direct: ``vllm.LLM(**rlhf_ray.backends.vllm.engine_kwargs(RolloutSpec.from_config(cfg), ...))`` in this process (same
    engine arguments, env and seed, 1 thread), ``llm.generate`` with the same token prompts and
    the same ``SamplingParams`` as ``VLLMBackend.generate`` builds;
  * in between: ``RolloutEngine.generate`` (the same plain class, no Ray) + ``pack_generation``
    in this process, which adds only our output conversion and packing to ``direct``.
Each path runs twice per repeat: without the sampled tokens' logprobs (most iterations) and with
``logprobs=0`` (the sync-check iterations, every ``sync.check_logprobs_every``).
Reported: seconds of each path, system / direct for both, and the split of the difference into
output conversion + packing (in-process) and Ray (call, pickling the ragged ``Generation``,
transfer); what asking for logprobs costs the direct engine; the pickled size of a
``Generation``; and the response tokens each path produced (sampling is random and the engines'
random streams diverge, so counts differ a little between paths).

What it leaves out: engine start-up, weight sync, prefix-cache effects across iterations
(every call here reuses the same prompts, in both paths alike).

Threads: this process and the actor both run vLLM with ``--threads`` OpenMP/torch threads
(default 1, as the demo config's rollout role; VLLM_CPU_OMP_THREADS_BIND=nobind).

Run (repository root, ~2 minutes on 2 cores):
    .venv/bin/python -m benchmarks.rollout_efficiency
    .venv/bin/python -m benchmarks.rollout_efficiency --sizes 8x8x32,32x8x64 --repeats 9
    .venv/bin/python -m benchmarks.rollout_efficiency --threads 2 --name rollout_efficiency_2threads
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import time

from benchmarks import _env
from benchmarks.ppo_throughput import parse_size


def make_config(model: str, prompts: int, samples: int, tokens: int, threads: int = 1):
    return _env.bench_config(model, **{"rollout.prompts_per_iteration": prompts, "rollout.samples_per_prompt": samples,
                                       "rollout.max_new_tokens": tokens, "learner.micro_batch_size": 1,
                                       "resources.rollout.threads": threads})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8x8x32,16x8x32", help="PROMPTSxSAMPLESxTOKENS list (64x32, 128x32)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1, help="rollout threads (resources.rollout.threads), both paths")
    ap.add_argument("--quiet-wait", type=float, default=60.0)
    ap.add_argument("--name", default="rollout_efficiency")
    args = ap.parse_args()

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    model = _env.tiny_model()
    # One engine config serves every size: max_model_len is the demo's 128 (prompts <= 48 tokens).
    cfg = make_config(model, *sizes[0], threads=args.threads)
    from rlhf_ray.backends.rollout import RolloutSpec
    from rlhf_ray.backends.vllm import engine_env

    engine_spec = RolloutSpec.from_config(cfg)
    os.environ.update(engine_env(engine_spec))  # before vllm is imported, as the actor's runtime_env does
    threads = _env.set_threads(cfg.resources.rollout.threads)
    quiet = _env.wait_for_quiet(args.quiet_wait)

    import ray
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from rlhf_ray.batch import pack_generation
    from rlhf_ray.coordinator.preflight import prepare_inputs
    from rlhf_ray.runtime.cluster import base_env
    from rlhf_ray.runtime.groups import RolloutGroup
    from rlhf_ray.workers.actors import RolloutActor
    from rlhf_ray.workers.rollout import RolloutEngine, SamplingSpec

    inputs = prepare_inputs(cfg)
    _env.start_ray(num_cpus=4)
    res = cfg.resources.rollout
    actor = RolloutActor.options(num_cpus=res.num_cpus, max_concurrency=1, name="bench-rollout",
                                 runtime_env={"env_vars": {**base_env(res.threads), **engine_env(engine_spec)}}).remote(
                                     engine_spec, 0)
    group = RolloutGroup([actor], cfg.resources.call_timeout_s)
    ray.get(actor.ping.remote())
    local = RolloutEngine(engine_spec, 0)  # the same plain class, in this process; its LLM is the "direct" engine
    _env.set_threads(cfg.resources.rollout.threads)

    results = []
    for size in sizes:
        prompts_n, samples, tokens = size
        base_spec = SamplingSpec.from_config(make_config(model, *size, threads=args.threads))
        prompt_ids = [inputs.prompts.token_ids[i] for i in range(prompts_n)]
        token_prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        # Both kinds of iteration: with the engines' logprobs (sync-check iterations) and without.
        modes = {"logprobs": True, "no_logprobs": False}
        times: dict[str, list[float]] = {f"{path}/{mode}": [] for mode in modes
                                         for path in ("system", "direct", "in_process_engine_and_pack")}
        tokens_per_call, direct_tokens, gen_bytes = [], [], 0
        for rep in range(args.warmup + args.repeats):
            for mode, with_lp in modes.items():
                spec = dataclasses.replace(base_spec, logprobs=with_lp)
                params = SamplingParams(n=spec.n, max_tokens=spec.max_new_tokens, temperature=spec.temperature,
                                        top_p=spec.top_p, top_k=spec.top_k,
                                        stop_token_ids=list(spec.stop_token_ids) or None,
                                        logprobs=0 if with_lp else None, detokenize=False)
                t0 = time.perf_counter()
                gen = group.generate(prompt_ids, spec).result()
                pack_generation(gen, inputs.pad_id, inputs.eos_ids)
                t_sys = time.perf_counter() - t0

                t0 = time.perf_counter()
                outs = local.backend.llm.generate(token_prompts, params, use_tqdm=False)
                t_direct = time.perf_counter() - t0

                t0 = time.perf_counter()
                gen_local = local.generate(prompt_ids, list(range(len(prompt_ids))), spec)
                pack_generation(gen_local, inputs.pad_id, inputs.eos_ids)
                t_local = time.perf_counter() - t0
                if rep >= args.warmup:
                    times[f"system/{mode}"].append(t_sys)
                    times[f"direct/{mode}"].append(t_direct)
                    times[f"in_process_engine_and_pack/{mode}"].append(t_local)
                    direct_tokens.append(sum(len(c.token_ids) for o in outs for c in o.outputs))
                    tokens_per_call.append(sum(len(r) for r in gen.response_ids))
                    gen_bytes = max(gen_bytes, len(pickle.dumps(gen)))
        med = {k: _env.median(v) for k, v in times.items()}
        entry = {
            "size": f"{prompts_n}x{samples}x{tokens}", "samples": prompts_n * samples, "max_new_tokens": tokens,
            "response_tokens_mean": _env.mean(tokens_per_call),
            "median_s": med, "all_s": times,
            "generation_pickle_bytes": gen_bytes,
            "direct_response_tokens_mean": _env.mean(direct_tokens),
            "direct_tokens_per_s": _env.mean(direct_tokens) / med["direct/no_logprobs"],
            "logprobs_cost_direct": med["direct/logprobs"] / med["direct/no_logprobs"] - 1.0,
        }
        for mode in modes:
            entry[f"system_over_direct/{mode}"] = med[f"system/{mode}"] / med[f"direct/{mode}"]
            entry[f"conversion_and_pack_s/{mode}"] = med[f"in_process_engine_and_pack/{mode}"] - med[f"direct/{mode}"]
            entry[f"ray_s/{mode}"] = med[f"system/{mode}"] - med[f"in_process_engine_and_pack/{mode}"]
        results.append(entry)
    ray.kill(actor)

    rows = [{"samples x tok": f"{r['samples']}x{r['max_new_tokens']}", "logprobs": mode == "logprobs",
             "tok system": r["response_tokens_mean"], "tok direct": r["direct_response_tokens_mean"],
             "direct s": r["median_s"][f"direct/{mode}"],
             "in-proc+pack s": r["median_s"][f"in_process_engine_and_pack/{mode}"],
             "system s": r["median_s"][f"system/{mode}"], "system/direct": r[f"system_over_direct/{mode}"],
             "convert+pack s": r[f"conversion_and_pack_s/{mode}"], "ray s": r[f"ray_s/{mode}"],
             "pickle KiB": r["generation_pickle_bytes"] / 1024}
            for r in results for mode in ("no_logprobs", "logprobs")]
    _env.print_table(rows, title=f"\ngenerate: medians over {args.repeats} calls after {args.warmup} warm-up (seconds); "
                                 "logprobs=True on sync-check iterations only (sync.check_logprobs_every)")
    key = {r["size"]: {"system_over_direct": round(r["system_over_direct/no_logprobs"], 3),
                       "system_over_direct_with_logprobs": round(r["system_over_direct/logprobs"], 3),
                       "direct_s": round(r["median_s"]["direct/no_logprobs"], 4),
                       "logprobs_cost_direct": round(r["logprobs_cost_direct"], 3)} for r in results}
    _env.save_results(args.name, {"args": vars(args), "threads": threads, "load": quiet, "loadavg_end": _env.loadavg(),
                                  "engine_env": engine_env(engine_spec), "sizes": results}, key)


if __name__ == "__main__":
    main()
