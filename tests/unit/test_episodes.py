"""Multi-turn episodes: the runner (turns, observations, limits, broken environments, concurrency),
the batch they pack into, the estimators on episodes, and a PPO step through the coordinator.

The fake engine answers each turn with the token ids of a scripted text and logprob -0.5 per token;
the character tokenizer maps each character to one id, so ids and texts are easy to read.
"""

from __future__ import annotations

import threading

import pytest
import torch

from rlhf_ray.algorithms import ESTIMATORS, AdvantageInputs
from rlhf_ray.backends.rollout import SamplingSpec
from rlhf_ray.batch import Generation, pack_generation
from rlhf_ray.config import config_from_dict
from rlhf_ray.config.schema import ConfigError
from rlhf_ray.config.validate import validate
from rlhf_ray.coordinator.episodes import EpisodeLimits, EpisodeRunner, episode_metrics
from rlhf_ray.envs.base import EnvError, StepResult, check_env, load_env_class
from rlhf_ray.runtime.pending import Done, RemoteCallError

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 <>/=.?*+-:"
EOS = 1


def encode(text: str) -> list[int]:
    return [10 + CHARS.index(c) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(CHARS[i - 10] for i in ids if i >= 10)


class ScriptedEngine:
    """Turn k of every episode is ``turns[k]`` (k = how many turns its context already holds, read
    from the marker ``|`` the tests' environments never emit: here, the count of ``obs`` ids)."""

    def __init__(self, turns: list[str], eos_last: bool = True) -> None:
        self.turns, self.eos_last = turns, eos_last
        self.contexts: list[list[int]] = []
        self.lock = threading.Lock()

    def __call__(self, prompt_ids, spec):
        out = Generation([], [], [], [], [])
        for ctx in prompt_ids:
            with self.lock:
                self.contexts.append(list(ctx))
            k = min(decode(ctx).count("="), len(self.turns) - 1)  # observations start with "="
            tokens = encode(self.turns[k]) + ([EOS] if self.eos_last and k == len(self.turns) - 1 else [])
            tokens = tokens[:spec.max_new_tokens]
            out.prompt_ids.append(list(ctx))
            out.response_ids.append(tokens)
            out.logprobs.append([-0.5] * len(tokens))
            out.finish_reasons.append("stop")
            out.prompt_index.append(len(out.prompt_index))
        return Done(out)


class Calc:
    """Answers ``<x>`` turns with ``=<x * 2>`` and ends on a turn without ``<``; reward 1 per call."""

    def reset(self, record):
        self.record = record

    def step(self, text):
        if "<" in text:
            return StepResult(f"={len(text)}.", reward=1.0, info={"tool_calls": 1})
        return StepResult("", reward=0.0, done=True)


def _runner(env=Calc, turns=3, budget=64, timeout=5.0, workers=4):
    return EpisodeRunner(env, encode, decode, EpisodeLimits(turns, budget, timeout, workers))


SPEC = SamplingSpec(n=2, max_new_tokens=8)


# ---- the runner -------------------------------------------------------------------------------


def test_three_turn_episode_keeps_sampled_tokens_and_marks_observations():
    engine = ScriptedEngine(["<ab>", "<c>", "ok"])
    gen = _runner().run([engine], [encode("q?")], [{"prompt": "q?"}], SPEC)
    assert len(gen) == 2 and gen.prompt_index == [0, 0]
    want = encode("<ab>") + encode("=4.") + encode("<c>") + encode("=3.") + encode("ok") + [EOS]
    assert gen.response_ids[0] == want
    acts = [True] * 4 + [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3
    assert gen.action_masks[0] == acts
    assert gen.logprobs[0] == [-0.5 if a else 0.0 for a in acts]
    # turn rewards on each turn's last token: 1 after each tool call, 0 on the final turn
    rewards = [0.0] * len(want)
    rewards[3] = rewards[9] = 1.0
    assert gen.turn_rewards[0] == rewards
    assert gen.finish_reasons == ["stop", "stop"]
    assert gen.episodes[0]["turns"] == 3 and gen.episodes[0]["tool_calls"] == 2
    assert gen.episodes[0]["observation_tokens"] == 6
    # token in, token out: each turn's context is the prompt, then the exact ids so far
    contexts = sorted(engine.contexts, key=len)
    assert contexts[-1] == encode("q?") + want[:-3]


def test_limits_end_episodes_with_their_reason():
    engine = ScriptedEngine(["<ab>"], eos_last=False)  # always calls the tool: never done
    gen = _runner(turns=2).run([engine], [encode("q")], [{}], SamplingSpec(n=1, max_new_tokens=8))
    assert gen.finish_reasons == ["max_turns"]
    assert gen.response_ids[0] == encode("<ab>=4.<ab>")  # no observation after the last turn
    gen = _runner(turns=9, budget=10).run([engine], [encode("q")], [{}], SamplingSpec(n=1, max_new_tokens=8))
    assert gen.finish_reasons == ["max_episode_tokens"]
    assert len(gen.response_ids[0]) <= 10 and gen.action_masks[0][-1] is True
    batch = pack_generation(gen, 0, [EOS])
    assert bool(batch.truncated[0])  # cut off without EOS


class Raises(Calc):
    def step(self, text):
        raise ZeroDivisionError("boom")


class Hangs(Calc):
    def step(self, text):
        threading.Event().wait(30)


class WrongType(Calc):
    def step(self, text):
        return "=1."


class BadReset(Calc):
    def reset(self, record):
        raise KeyError("answer")


@pytest.mark.parametrize("env,reason", [(Raises, "env_error"), (Hangs, "env_timeout"), (WrongType, "env_error"),
                                        (BadReset, "env_error")])
def test_a_broken_environment_ends_only_its_episode(env, reason):
    engine = ScriptedEngine(["<ab>", "ok"])
    gen = _runner(env=env, timeout=0.3).run([engine], [encode("q")], [{}], SamplingSpec(n=2, max_new_tokens=8))
    assert gen.finish_reasons == [reason, reason]
    assert gen.response_ids[0] == encode("<ab>")  # the first turn is kept; nothing after it
    m = episode_metrics(gen)
    assert m[f"episode/finish_{reason}"] == 2.0


def test_env_steps_run_at_once():
    """Four steps wait on one barrier of four: the runner must run them together (with one step at
    a time the barrier breaks after its timeout and every episode ends as env_error)."""
    barrier = threading.Barrier(4, timeout=5)

    class Together(Calc):
        def step(self, text):
            barrier.wait()
            return StepResult("", done=True)

    gen = _runner(env=Together, workers=4).run([ScriptedEngine(["x"])], [encode("a"), encode("b")], [{}, {}],
                                               SamplingSpec(n=2, max_new_tokens=8))
    assert gen.finish_reasons == ["stop"] * 4


def test_an_engine_generates_other_episodes_while_a_tool_runs():
    """Episode 0's tool answers only after episode 1 has taken two more turns on the one engine; if the
    engine waited for the tool, episode 0 would time out."""
    other_done = threading.Event()

    class Slow(Calc):
        def reset(self, record):
            self.slow = record["slow"]

        def step(self, text):
            if self.slow and not other_done.wait(5):
                raise TimeoutError("the engine waited for this tool")
            if not self.slow and "<" not in text:
                other_done.set()
            return super().step(text)

    engine = ScriptedEngine(["<ab>", "<c>", "ok"])
    gen = _runner(env=Slow, timeout=8).run([engine], [encode("p"), encode("q")], [{"slow": True}, {"slow": False}],
                                           SamplingSpec(n=1, max_new_tokens=8))
    assert gen.finish_reasons == ["stop", "stop"]


def test_an_engine_failure_stops_the_call():
    def dead(prompt_ids, spec):
        raise RemoteCallError("rollout engine 0 died", "died", ("rollout", 0), "generate")

    with pytest.raises(RemoteCallError, match="died"):
        _runner().run([dead], [encode("q")], [{}], SPEC)


def test_episodes_spread_over_engines():
    a, b = ScriptedEngine(["<a>", "ok"]), ScriptedEngine(["<a>", "ok"])
    gen = _runner().run([a, b], [encode("p"), encode("q")], [{}, {}], SamplingSpec(n=4, max_new_tokens=8))
    assert gen.finish_reasons == ["stop"] * 8
    assert a.contexts and b.contexts and len(a.contexts) + len(b.contexts) == 16  # 8 episodes x 2 turns


# ---- the batch and the estimators ---------------------------------------------------------------


def _episode_batch():
    gen = _runner().run([ScriptedEngine(["<ab>", "ok"])], [encode("q?"), encode("r")], [{}, {}],
                        SamplingSpec(n=2, max_new_tokens=8))
    return pack_generation(gen, 0, [EOS])


def test_pack_generation_carries_actions_and_turn_rewards():
    batch = _episode_batch()
    assert batch.action_mask.shape == batch.response_mask.shape
    assert bool((batch.action_mask <= batch.response_mask).all())
    assert batch.action_mask[0].tolist()[:10] == [True] * 4 + [False] * 3 + [True] * 3
    assert batch.turn_rewards[0, 3] == 1.0 and float(batch.turn_rewards.sum()) == 4.0
    # the rows of a concat and a selection keep the episode fields
    assert Generation.concat([_runner().run([ScriptedEngine(["x"])], [encode("a")], [{}], SPEC)] * 2).episodes


def _inputs(mask, actions=None, turn_rewards=None, values=None):
    B, R = mask.shape
    return AdvantageInputs(scores=torch.tensor([1.0, 0.0, 2.0, 1.0])[:B], kl=torch.full((B, R), 0.1),
                           reward_kl_coef=0.5, values=values if values is not None else torch.rand(B, R),
                           groups=torch.tensor([0, 0, 1, 1])[:B], mask=mask, valid=torch.ones(B, dtype=torch.bool),
                           gamma=1.0, lam=0.9, whiten=False, group_std_norm=True, actions=actions,
                           turn_rewards=turn_rewards)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_one_turn_episodes_give_exactly_the_single_turn_numbers(name):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    values = torch.rand(4, 4)
    plain = ESTIMATORS[name].compute(_inputs(mask, values=values))
    episode = ESTIMATORS[name].compute(_inputs(mask, actions=mask.clone(), turn_rewards=torch.zeros(4, 4),
                                               values=values))
    assert torch.equal(plain.advantages, episode.advantages) and torch.equal(plain.returns, episode.returns)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_observations_get_no_advantage_and_change_nothing_else(name):
    """Row 0 is act, obs, act: the observation gets 0, and with gamma 1, the KL only on actions and no
    turn reward the actions' advantages are those of the same row without the observation (act, act)."""
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    actions = mask.clone()
    actions[0, 1] = False
    values = torch.tensor([[0.2, 9.0, 0.4], [0.1, 0.3, 0.0], [0.5, 0.2, 0.0], [0.3, 0.1, 0.2]])
    out = ESTIMATORS[name].compute(_inputs(mask, actions=actions, values=values))
    assert float(out.advantages[0, 1]) == 0.0 and float(out.returns[0, 1]) == 0.0
    squeezed_mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    squeezed_values = values.clone()
    squeezed_values[0] = torch.tensor([0.2, 0.4, 0.0])
    ref = ESTIMATORS[name].compute(_inputs(squeezed_mask, values=squeezed_values))
    torch.testing.assert_close(out.advantages[0, [0, 2]], ref.advantages[0, :2])
    torch.testing.assert_close(out.advantages[1:], ref.advantages[1:])


def test_gae_turn_rewards_land_on_the_turn_end_by_hand():
    """One row: act(turn 1 end, reward 1), obs, act(last, score 2); gamma 1, lam 1, no KL, values
    [.5, -, .25]: A_2 = 2 - .25 = 1.75; A_0 = 1 + V_2 - V_0 + A_2 = 1 + .25 - .5 + 1.75 = 2.5."""
    mask = torch.ones(1, 3, dtype=torch.bool)
    actions = torch.tensor([[True, False, True]])
    x = AdvantageInputs(scores=torch.tensor([2.0]), kl=torch.zeros(1, 3), reward_kl_coef=0.0,
                        values=torch.tensor([[0.5, 7.0, 0.25]]), groups=torch.tensor([0]), mask=mask,
                        valid=torch.tensor([True]), gamma=1.0, lam=1.0, whiten=False, group_std_norm=True,
                        actions=actions, turn_rewards=torch.tensor([[1.0, 0.0, 0.0]]))
    out = ESTIMATORS["gae"].compute(x)
    torch.testing.assert_close(out.advantages, torch.tensor([[2.5, 0.0, 1.75]]))
    torch.testing.assert_close(out.returns, torch.tensor([[3.0, 0.0, 2.0]]))


def test_group_estimators_add_turn_rewards_to_the_outcome():
    """GRPO, two samples of one prompt: scores 1 and 1, the first got a turn reward of 1: outcomes 2 and
    1, mean 1.5, std (n-1) sqrt(.5): advantages +-0.5 / 0.7071."""
    mask = torch.ones(2, 2, dtype=torch.bool)
    x = AdvantageInputs(scores=torch.tensor([1.0, 1.0]), kl=torch.zeros(2, 2), reward_kl_coef=0.0, values=None,
                        groups=torch.tensor([0, 0]), mask=mask, valid=torch.tensor([True, True]), gamma=1.0,
                        lam=1.0, whiten=False, group_std_norm=True, actions=torch.tensor([[True, True], [True, False]]),
                        turn_rewards=torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    out = ESTIMATORS["grpo"].compute(x)
    a = 0.5 / (0.5 ** 0.5 + 1e-6)
    torch.testing.assert_close(out.advantages, torch.tensor([[a, a], [-a, 0.0]]))


# ---- config and the environment's loader ---------------------------------------------------------


def test_episode_budget_must_fit_the_context():
    cfg = config_from_dict({"rollout": {"env": "x.py:E", "max_episode_tokens": 64, "max_new_tokens": 16,
                                        "max_model_len": 96}, "data": {"max_prompt_tokens": 40}})
    with pytest.raises(ConfigError, match="max_episode_tokens 64; raise it to at least 104"):
        validate(cfg)
    cfg = config_from_dict({"rollout": {"env": "x.py:E", "max_new_tokens": 16, "max_model_len": 50},
                            "data": {"max_prompt_tokens": 40}})
    with pytest.raises(ConfigError, match="at least one turn of --rollout.max_new_tokens 16, but its budget is 10"):
        validate(cfg)


def test_env_loader_says_what_is_wrong(tmp_path):
    good = tmp_path / "env.py"
    good.write_text("class E:\n    def __init__(self, k=1):\n        self.k = k\n"
                    "    def reset(self, record):\n        pass\n    def step(self, text):\n        pass\n"
                    "class NoStep:\n    def reset(self, record):\n        pass\n")
    assert load_env_class(f"{good}:E").__name__ == "E"
    with pytest.raises(EnvError, match="no file"):
        load_env_class(f"{tmp_path}/missing.py:E")
    with pytest.raises(EnvError, match="no step method"):
        load_env_class(f"{good}:NoStep")
    with pytest.raises(EnvError, match="has no class 'F'"):
        load_env_class(f"{good}:F")
    with pytest.raises(EnvError, match="failed"):
        check_env(f"{good}:E", {"nope": 1})
    with pytest.raises(EnvError, match="not of the form"):
        load_env_class("just_a_name")


# ---- a PPO step on episodes, through the coordinator with in-process fakes ---------------------------


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return encode(text)

    def decode(self, ids, skip_special_tokens=True):
        return decode(ids)


class EpisodeRollout:
    """The coordinator's rollout with a scripted engine (no engine_calls: generate serves as one)."""

    def __init__(self) -> None:
        self.engine = ScriptedEngine(["<ab>", "ok"])

    def generate(self, prompt_ids, spec):
        return self.engine(prompt_ids, spec)


class ObservationBlindLearners:
    """Old logprobs equal the engine's on actions but are -7 at observations (where the engine has none),
    so a logprob check that reads observation tokens would report a mismatch."""

    def __init__(self) -> None:
        self.train_calls = []

    def compute_old(self, batch):
        old = torch.where(batch.actions, batch.rollout_logprobs, torch.full_like(batch.rollout_logprobs, -7.0))
        return Done((old * batch.response_mask, torch.zeros(batch.response_mask.shape)))

    def train(self, update, iteration):
        self.train_calls.append(update)
        return Done({"policy_loss": 0.0})


def test_a_ppo_step_on_episodes_trains_only_the_policys_tokens():
    from tests.unit.test_coordinator import PAD, FakeReference, FakeReward, FakeSync, _prompts, _put

    from rlhf_ray.coordinator.loop import PPOCoordinator

    cfg = config_from_dict({"seed": 3, "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2,
                                                   "max_new_tokens": 8, "num_engines": 1, "max_turns": 3,
                                                   "env": "tests.unit.test_episodes:Calc"},
                            "ppo": {"mini_batches": 1, "estimator": "gae"},
                            "sync": {"check_logprobs_every": 1},
                            "learner": {"num_ranks": 1, "micro_batch_size": 4}})
    learners = ObservationBlindLearners()
    coord = PPOCoordinator(cfg, _prompts(), PAD, [EOS], EpisodeRollout(), FakeReference(gap=0.5), FakeReward(),
                           learners, FakeSync(), put=_put, tokenizer=CharTokenizer())
    m = coord.step()
    batch = coord.last_batch
    update = learners.train_calls[0]
    assert batch.action_mask is not None and not bool(batch.action_mask.all())
    # the loss mask is the actions: observation tokens get no loss, no advantage
    assert torch.equal(update.response_mask, batch.action_mask & batch.response_mask.any(-1, keepdim=True))
    assert float(update.advantages[~batch.action_mask].abs().sum()) == 0.0
    # the KL counts actions only (0.5 per action token), and the logprob check ignores observations
    actions_per_row = batch.action_mask.sum(-1).float()
    assert m["kl_mean"] == pytest.approx(0.5 * float(actions_per_row.mean()))
    assert m["logprob_mismatch_mean"] == 0.0
    assert m["episode/turns_mean"] == 2.0 and m["episode/tool_call_rate"] == 1.0
    assert m["episode/observation_token_share"] > 0


def test_the_memory_plan_counts_a_whole_episode():
    from rlhf_ray.backends.memory import _tokens

    single = config_from_dict({"rollout": {"max_new_tokens": 16}, "data": {"max_prompt_tokens": 32}})
    episode = config_from_dict({"rollout": {"max_new_tokens": 16, "env": "x.py:E", "max_turns": 3,
                                            "max_model_len": 80}, "data": {"max_prompt_tokens": 32}})
    assert _tokens(episode)[0] == _tokens(single)[0] * (32 + 48) // (32 + 16)


def test_rollout_dump_shows_episodes_as_conversations():
    from rlhf_ray.batch import marked_text
    from rlhf_ray.coordinator.rollout_dump import rollout_rows

    batch = _episode_batch()
    B, R = batch.response_mask.shape
    batch = batch.replace(scores=torch.zeros(B), old_logprobs=torch.zeros(B, R), ref_logprobs=torch.full((B, R), -1.0),
                          advantages=torch.ones(B, R))
    row = rollout_rows(batch, CharTokenizer(), 0, "k1")[0]
    assert row["turns"] == 2
    assert row["conversation"] == [{"role": "policy", "text": "<ab>"}, {"role": "observation", "text": "=4."},
                                   {"role": "policy", "text": "ok"}]
    assert row["kl"] == pytest.approx(7.0)  # k1 = 0 - (-1) on each of the 7 policy tokens (<ab>, ok, EOS)
    assert len(row["advantages"]) == 7
    assert marked_text(row["conversation"]) == "<ab>[[=4.]]ok"


def test_an_engine_lost_mid_episode_redoes_the_iteration_with_nothing_lost_or_doubled():
    from tests.unit.test_coordinator import PAD, FakeReference, FakeReward, FakeSync, _prompts, _put

    from rlhf_ray.coordinator.loop import PPOCoordinator

    class DiesOnce(EpisodeRollout):
        def __init__(self) -> None:
            super().__init__()
            self.died = False

        def generate(self, prompt_ids, spec):
            if not self.died and any("=" in decode(ctx) for ctx in prompt_ids):  # a second turn: mid-episode
                self.died = True
                raise RemoteCallError("rollout engine 0 died", "died", ("rollout", 0), "generate")
            return super().generate(prompt_ids, spec)

        def first_turns(self) -> list[list[int]]:
            return [ctx for ctx in self.engine.contexts if "=" not in decode(ctx)]

    cfg = config_from_dict({"seed": 3, "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2,
                                                   "max_new_tokens": 8, "max_turns": 3,
                                                   "env": "tests.unit.test_episodes:Calc"},
                            "ppo": {"mini_batches": 1}, "learner": {"num_ranks": 1, "micro_batch_size": 4}})
    rollout, learners = DiesOnce(), ObservationBlindLearners()
    coord = PPOCoordinator(cfg, _prompts(), PAD, [EOS], rollout, FakeReference(), FakeReward(), learners,
                           FakeSync(), put=_put, tokenizer=CharTokenizer())
    with pytest.raises(RemoteCallError) as failed:
        coord.step()
    assert failed.value.phase == "generate" and coord.iteration == 0 and not learners.train_calls
    first_attempt = rollout.first_turns()  # the first turns sampled before the engine died
    m = coord.step()
    assert m["iteration"] == 0 and len(learners.train_calls) == 1  # redone once, trained once
    redone = rollout.first_turns()[len(first_attempt):]
    assert len(redone) == 4 and all(ctx in redone for ctx in first_attempt)  # the same prompts, from their start
    assert m["episode/finish_stop"] == 4.0 and coord.last_batch.action_mask.shape[0] == 4


def test_eval_samples_mark_the_observations(tmp_path):
    from rlhf_ray.coordinator.gold import read_eval_samples, write_eval_samples

    batch = _episode_batch()
    write_eval_samples(str(tmp_path), 0, batch.replace(scores=torch.zeros(len(batch))), CharTokenizer(), None)
    rows = read_eval_samples(str(tmp_path / "eval_samples" / "iter_000000.jsonl"))
    assert rows[0]["response"] == "<ab>[[=4.]]ok"


def test_an_environment_that_cannot_be_built_stops_before_any_role(tmp_path):
    from rlhf_ray.config import load_config
    from rlhf_ray.coordinator.preflight import prepare_inputs
    from rlhf_ray.tiny_models import build_tiny_model

    model = str(build_tiny_model(tmp_path / "m", arch="llama", seed=0))
    env = tmp_path / "env.py"
    env.write_text("class Needs:\n    def __init__(self, tools):\n        pass\n"
                   "    def reset(self, record):\n        pass\n    def step(self, text):\n        pass\n")
    cfg = load_config(None, {"model.path": model, "eval.every": 0, "rollout.env": f"{env}:Needs"})
    with pytest.raises(EnvError, match=r"Needs\(\*\*\{\}\) failed \(TypeError: .*tools.*fix rollout.env_args"):
        prepare_inputs(cfg)


def test_an_environment_stays_on_one_thread_and_resets_run_at_once():
    """reset and every step of one episode run on the same thread (thread-bound state such as a
    database connection works); the resets of different episodes run together (a barrier of 4)."""
    barrier = threading.Barrier(4, timeout=5)

    class Bound(Calc):
        def reset(self, record):
            barrier.wait()
            self.threads = {threading.get_ident()}

        def step(self, text):
            self.threads.add(threading.get_ident())
            if len(self.threads) > 1:
                raise RuntimeError("called from another thread")
            return super().step(text)

    gen = _runner(env=Bound).run([ScriptedEngine(["<ab>", "<c>", "ok"])], [encode("a"), encode("b")], [{}, {}],
                                 SamplingSpec(n=2, max_new_tokens=8))
    assert gen.finish_reasons == ["stop"] * 4 and all(e["turns"] == 3 for e in gen.episodes)


def test_due_episodes_are_shared_between_idle_engines():
    from rlhf_ray.coordinator.episodes import Episode, _Queue

    q = _Queue(running=8, engines=2)
    taken: list[int] = []
    threads = [threading.Thread(target=lambda: taken.append(len(q.take()))) for _ in range(2)]
    for t in threads:
        t.start()
    while q.waiting < 2:
        threading.Event().wait(0.001)
    q.put([Episode(i, [1], None) for i in range(8)])
    for t in threads:
        t.join(5)
    assert sorted(taken) == [4, 4]


def test_evaluation_turns_end_at_the_stop_strings_too():
    from tests.unit.test_coordinator import PAD, FakeLearners, FakeReference, FakeReward, FakeSync, _prompts, _put

    from rlhf_ray.coordinator.loop import PPOCoordinator

    class Recording(EpisodeRollout):
        specs: list = []

        def generate(self, prompt_ids, spec):
            self.specs.append(spec)
            return super().generate(prompt_ids, spec)

    cfg = config_from_dict({"rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2, "stop": ["</calc>"],
                                        "env": "tests.unit.test_episodes:Calc"},
                            "ppo": {"mini_batches": 1}, "learner": {"num_ranks": 1, "micro_batch_size": 4},
                            "eval": {"every": 1, "max_new_tokens": 5}})
    rollout = Recording()
    coord = PPOCoordinator(cfg, _prompts(), PAD, [EOS], rollout, FakeReference(), FakeReward(),
                           FakeLearners(), FakeSync(), put=_put, eval_prompts=_prompts(2), tokenizer=CharTokenizer())
    coord.evaluate()
    assert rollout.specs and all(s.stop == ("</calc>",) and s.max_new_tokens == 5 and s.n == 1 for s in rollout.specs)
    coord.step()
    assert rollout.specs[-1].stop == ("</calc>",) and rollout.specs[-1].max_new_tokens == 16
