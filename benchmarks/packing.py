"""Padding-free packing vs padded micro-batches in the PPO learner, on real variable-length responses.

    python -m benchmarks.packing [--model-hidden 256 --model-layers 4] [--batch 64] [--repeats 5]

What it measures: one learner rank (the project's ``Learner``, in this process, DeepSpeed ZeRO-2
over gloo, world size 1, fp32 on the CPU) computing old logprobs and values and running one PPO
update (1 epoch, 2 mini-batches) on the same batch, once with ``learner.packing`` on and once
off, alternating A/B/A/B so that this VM's drift hits both alike. The batch holds the prompts and
responses of the offline demo SFT set (``rlhf_ray.data.demo_data``: answers from " 42" to " The
answer is forty-two apples."), i.e. the variable lengths an SFT policy produces, plus EOS.

Reported per mode: tokens through the model per update (padding included), the padding
fraction, seconds for old logprobs + update (median), and the ratio. What it leaves out: Ray,
generation, the other roles (see ``benchmarks.ppo_throughput`` for a whole iteration), GPUs
(``benchmarks.learner_gpu``). Saves ``benchmarks/results/packing.json``.
"""

from __future__ import annotations

import argparse
import time

from benchmarks._env import bench_config, median, print_table, save_results, set_threads, tiny_model


def demo_batch(tokenizer, batch: int, seed: int):
    """An ExperienceBatch of ``batch`` demo SFT (prompt, response + EOS) pairs with the fields
    the learner's update reads (old logprobs/values filled in by the learner itself later)."""
    import torch

    from rlhf_ray.batch import Generation, pack_generation
    from rlhf_ray.data.demo_data import sft_records

    records = sft_records(batch, seed)
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in records]
    responses = [tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for r in records]
    gen = Generation(prompts, responses, [[0.0] * len(r) for r in responses], ["stop"] * batch, list(range(batch)))
    packed = pack_generation(gen, pad_id=tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    mask = packed.response_mask
    noise = torch.randn(mask.shape, generator=g) * mask
    return packed.replace(advantages=noise, returns=noise * 0.5, ref_logprobs=torch.zeros(mask.shape))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-hidden", type=int, default=256)
    parser.add_argument("--model-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64, help="sequences per update")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="packing", help="results file name (benchmarks/results/<name>.json)")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    from transformers import AutoTokenizer

    from rlhf_ray.tiny_models import count_parameters
    from rlhf_ray.weight_sync.transport import free_port
    from rlhf_ray.batch import TrainUpdate
    from rlhf_ray.workers.learner import Learner, LearnerSpec

    path = tiny_model(f"llama-h{args.model_hidden}-l{args.model_layers}", hidden_size=args.model_hidden,
                      num_layers=args.model_layers)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = demo_batch(tokenizer, args.batch, seed=0)
    learners = {}
    for packing in (True, False):
        cfg = bench_config(path, **{
            "learner.num_ranks": 1, "learner.zero_stage": 2, "learner.packing": packing,
            "learner.micro_batch_size": args.micro_batch, "learner.forward_batch_size": args.micro_batch,
            "rollout.prompts_per_iteration": args.batch, "rollout.samples_per_prompt": 1,
            "ppo.mini_batches": 2, "ppo.epochs": 1, "ppo.iterations": 10 * args.repeats,
            "resources.learner.threads": args.threads, "learner.lr": 1e-6})
        learner = Learner(LearnerSpec.from_config(cfg), rank=0)
        learner.setup("127.0.0.1", free_port())
        learners["packed" if packing else "padded"] = learner

    times: dict[str, list[float]] = {k: [] for k in learners}
    last: dict[str, dict] = {}
    for it in range(args.repeats + 1):  # the first round warms up and is not timed
        for mode, learner in learners.items():
            t0 = time.perf_counter()
            learner.compute_old(batch)  # the rank keeps its slice with its old logprobs and values
            metrics = learner.train(TrainUpdate.of(batch), it)
            if it:
                times[mode].append(time.perf_counter() - t0)
            last[mode] = metrics

    rows = [{"mode": mode, "tokens/update": last[mode]["learner_tokens"],
             "padding_fraction": last[mode]["padding_fraction"], "seconds": median(times[mode]),
             "seconds_min": min(times[mode])} for mode in learners]
    lengths = batch.response_mask.sum(-1).float()
    print(f"{args.batch} demo SFT sequences: response tokens {int(lengths.min())}-{int(lengths.max())} "
          f"(mean {float(lengths.mean()):.1f}), prompt + response real tokens {int(batch.attention_mask.sum())}; "
          f"model {count_parameters(path):,} parameters")
    print_table(rows, title="learner update (old logprobs + 1 epoch x 2 mini-batches), ZeRO-2, 1 rank, CPU")
    speedup = median(times["padded"]) / median(times["packed"])
    token_ratio = last["padded"]["learner_tokens"] / last["packed"]["learner_tokens"]
    print(f"packed vs padded: {token_ratio:.2f}x fewer tokens through the model, {speedup:.2f}x faster")
    save_results(args.name, {"args": vars(args), "rows": rows, "times": times,
                             "response_lengths": lengths.tolist()},
                 {"token_ratio": token_ratio, "speedup": speedup, "packed_s": median(times["packed"]),
                  "padded_s": median(times["padded"])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
