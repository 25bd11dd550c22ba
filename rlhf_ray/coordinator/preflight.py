"""Pre-flight: everything about a PPO run that can be checked before Ray starts.

The models exist (tiny ones are built when asked), each GPU role fits its GPU (the memory plan,
``rlhf_ray.backends.memory_plan``), the LoRA adapters can reach the engines, the tokenizer has
EOS and a pad id, the prompts load and tokenise, the held-out evaluation prompts are set aside,
and the reward function (or endpoint) answers a probe call. A bad input fails here with one
message, before any actor holds a resource.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from rlhf_ray.backends.memory_plan import check_memory
from rlhf_ray.config import Config
from rlhf_ray.data.prompts import PromptSet, load_prompts, pad_token_id, split_holdout
from rlhf_ray.rewards import FieldParameters, field_parameters, load_reward_function


@dataclass
class Inputs:
    prompts: PromptSet
    pad_id: int
    eos_ids: list[int]
    tokenizer: object = None
    eval_prompts: PromptSet | None = None  # with eval.every > 0
    gold: object = None  # a coordinator.gold.GoldCheck with reward.gold


def eval_prompt_set(cfg: Config, prompts: PromptSet, tokenizer) -> tuple[PromptSet, PromptSet | None]:
    """(training prompts, evaluation prompts): eval.prompts tokenised like data.prompts, or
    eval.holdout prompts held out of the training set; no evaluation set when eval.every is 0."""
    ev = cfg.eval
    if ev.every <= 0:
        return prompts, None
    if ev.prompts is None:
        prompts, held = split_holdout(prompts, ev.holdout, cfg.seed)
    else:
        held = load_prompts(dataclasses.replace(cfg.data, prompts=ev.prompts), tokenizer, cfg.seed)
    return prompts, held.select(list(range(min(ev.max_prompts, len(held.token_ids)))))


def _check_model_dir(path: str, what: str, flag: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what} {path!r} is not a Hugging Face checkpoint (no config.json); "
                                f"point {flag} at a saved model directory.")


def check_lora_targets(cfg: Config) -> None:
    """LoRA adapters that could never reach the engines fail here, from the policy's config.json
    (no weights are read): see :func:`rlhf_ray.models.lora.tied_head_error`."""
    if cfg.model.lora.rank <= 0:
        return
    from transformers import AutoConfig

    from rlhf_ray.models.lora import tied_head_error

    error = tied_head_error(cfg.model.lora.target_modules, AutoConfig.from_pretrained(cfg.model.path), cfg.model.path)
    if error is not None:
        raise ValueError(error)


def check_value_init(cfg: Config) -> None:
    """A critic that cannot start from the reward model (model.value_init reward_model) fails here,
    from the checkpoints' configs, score head shape and tokenizers (no weights are read): see
    :func:`rlhf_ray.models.value_init.value_init_error`."""
    from rlhf_ray.config.critic import reward_model_for_value

    reward_path = reward_model_for_value(cfg)
    if reward_path is None:
        return
    from rlhf_ray.models.value_init import value_init_error

    error = value_init_error(cfg.model.path, reward_path, cfg.model.separate_critic)
    if error is not None:
        raise ValueError(error)


def probe_reward_function(spec: str, prompts: list[str], timeout_s: float,
                          fields: dict[str, list] | None = None) -> FieldParameters:
    """Load the reward function and call it once on real prompts with two made-up responses, so
    that a function that cannot be imported, raises, hangs, or returns the wrong number of scores
    fails here, before any actor starts. ``fields``: the prompts' record fields (one value per
    prompt; every field any record has, ``PromptSet.columns``): a parameter without a default that
    no record fills fails here too, and the call gets the fields the function takes. Returns which
    fields it takes."""
    import threading

    from rlhf_ray.rewards import call_once

    fn = load_reward_function(spec)
    takes = field_parameters(fn)
    takes.check(list(fields or {}), f"reward function {spec}")
    prompts = (prompts * 2)[:2]
    picked = {name: (values * 2)[:2] for name, values in takes.pick(fields).items()}
    result: dict = {}

    def call() -> None:
        try:
            result["scores"] = list(call_once(fn, prompts, ["", "42"], picked))  # an async def function is awaited
        except Exception as exc:  # reported below, in the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=call, daemon=True, name="reward-probe")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"reward function {spec} did not return within {timeout_s:.0f} s on a probe call with two "
                           "responses (--resources.call_timeout_s); it hangs or is far too slow.")
    if "error" in result:
        exc = result["error"]
        raise ValueError(f"reward function {spec} raised {type(exc).__name__} on a probe call with two responses "
                         f"(an empty one and '42'): {exc}. It must handle any response text.") from exc
    scores = result["scores"]
    if len(scores) != 2:
        raise ValueError(f"reward function {spec} returned {len(scores)} scores for 2 responses on a probe call; "
                         "it must return one float per response.")
    try:
        [float(x) for x in scores]
    except (TypeError, ValueError):
        raise ValueError(f"reward function {spec} returned {scores!r} on a probe call; scores must be numbers.") from None
    return takes


def prepare_inputs(cfg: Config) -> Inputs:
    """Everything that can be checked before Ray starts: models exist (building tiny ones if
    asked), the GPU roles fit their GPUs, the LoRA targets reach the engines, the tokenizer has
    pad/EOS, the reward function loads, prompts tokenize."""
    from transformers import AutoTokenizer

    if cfg.model.build_tiny and not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        from rlhf_ray.tiny_models import ensure_tiny_model

        ensure_tiny_model(cfg.model.path, arch=cfg.model.build_tiny, seed=cfg.seed)
    _check_model_dir(cfg.model.path, "policy model", "--model.path")
    check_lora_targets(cfg)
    if cfg.reference.path:
        _check_model_dir(cfg.reference.path, "reference model", "--reference.path")
    if cfg.reward.kind == "model":
        _check_model_dir(cfg.reward.model_path or "", "reward model", "--reward.model_path")
    check_value_init(cfg)
    check_memory(cfg)  # a role that cannot fit its GPU stops here, before Ray starts
    if cfg.rollout.env:
        from rlhf_ray.envs.base import check_env

        check_env(cfg.rollout.env, dict(cfg.rollout.env_args))  # cannot import or build one: stops here
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer at {cfg.model.path!r} has no EOS token; responses could never end. "
                         "Set eos_token in its tokenizer_config.json.")
    pad_id = pad_token_id(tok)
    prompts = load_prompts(cfg.data, tok, cfg.seed)
    print(f"prompts from {cfg.data.prompts}: {prompts.describe()}", flush=True)
    prompts, eval_prompts = eval_prompt_set(cfg, prompts, tok)
    if eval_prompts is not None and cfg.eval.prompts is not None:
        print(f"evaluation prompts from {cfg.eval.prompts}: {eval_prompts.describe()}", flush=True)
    probed = [0, 1 % len(prompts.token_ids)]  # two prompts (one twice in a set of one)
    if cfg.reward.kind == "function":
        takes = probe_reward_function(cfg.reward.function or "", prompts.texts[:2], cfg.resources.call_timeout_s,
                                      prompts.columns(probed))
        if eval_prompts is not None and cfg.eval.prompts is not None:
            takes.check(eval_prompts.field_names(), f"reward function {cfg.reward.function}", "--eval.prompts")
    elif cfg.reward.kind == "http":
        from rlhf_ray.reward_server import post_scores

        post_scores(cfg.reward.url or "", [prompts.texts[i] for i in probed], ["", "42"], cfg.reward.http_timeout_s,
                    cfg.reward.http_retries, cfg.reward.http_backoff_s,
                    prompts.columns(probed))  # an endpoint that is down fails here
    gold = None
    if cfg.reward.gold:
        from rlhf_ray.coordinator.gold import GoldCheck

        gold = GoldCheck(cfg.reward.gold, tok)  # an import error or a wrong name fails here
        gold.takes.check(prompts.field_names(), f"reward.gold {cfg.reward.gold}")
        if eval_prompts is not None and cfg.eval.prompts is not None:
            gold.takes.check(eval_prompts.field_names(), f"reward.gold {cfg.reward.gold}", "--eval.prompts")
    if len(prompts.token_ids) < cfg.rollout.prompts_per_iteration:
        held = f" (after holding out {cfg.eval.holdout} for evaluation)" if cfg.eval.every and not cfg.eval.prompts else ""
        raise ValueError(f"only {len(prompts.token_ids)} usable prompts{held} but --rollout.prompts_per_iteration is "
                         f"{cfg.rollout.prompts_per_iteration}; add prompts or lower it.")
    return Inputs(prompts, int(pad_id), [int(tok.eos_token_id), *cfg.rollout.stop_token_ids], tok, eval_prompts,
                  gold)
