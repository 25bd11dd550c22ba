"""The reward role's model path.

- A padded batch scores every sequence as it scores alone.
- PPO scores what training trained on: a (prompt, response) pair scored by the reward-model
  trainer's own forward (``RewardModelTrainer._loss`` on ``load_preference_data``'s batch) and by
  ``RewardScorer.score`` on a PPO batch holding the same prompt and response tokens (the prompt
  from PPO's prompt loader, the response as sampled, ending with EOS) get the same number; plain
  and chat pairs, a GPT-2 (absolute positions, no BOS) and a Llama (RoPE, adds BOS) reward
  model, a reward model sharing the policy's tokenizer or not. A response cut off before EOS
  scores differently, as the training input without EOS.
- Also where the pad token is EOS (Llama 3, Mistral, Qwen2.5 base): training and PPO read the
  score at the final EOS (``rlhf_ray/models/reward_head.py``), so a finished answer and the same
  answer cut off get different scores in both.
"""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_ray.config import load_config

# "<s>" first (the template writes BOS, as Llama 3's does), "<|user|>text\n" per user turn,
# "<|assistant|>" opens the reply and "</s>" (EOS) closes it.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
                 "{% else %}<|assistant|>{{ m['content'] }}</s>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

PAIRS = [("Q: what is 2 plus 3? A:", " 5", " five"),
         ("Write the number after 7:", " It is 8.", " It is eight, I think."),
         ("<s>a dog sees 4 birds. How many?", " 4", " four birds.")]  # a pre-rendered prompt: BOS written


def _tokenizer(adds_bos: bool, vocab_size: int = 300, pad_is_eos: bool = False):
    """The tiny byte-level tokenizer (<pad> 0, <s> 1, </s> 2), adding BOS first like Llama's when
    ``adds_bos``, with the chat template above; ``pad_is_eos``: its pad token is </s>, as a
    tokenizer without a pad token is given one."""
    from tokenizers import processors

    from rlhf_ray.tiny_models import build_tokenizer

    tok = build_tokenizer(seed=0, vocab_size=vocab_size)
    if adds_bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = CHAT_TEMPLATE
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    return tok


def _reward_model(path, arch: str = "gpt2", adds_bos: bool = False, pad_is_eos: bool = False) -> str:
    """A tiny sequence-classification reward model with one label, saved with its tokenizer.
    GPT-2 has learned absolute positions (made large, so shifted positions change scores).
    ``pad_is_eos``: the tokenizer's and the model config's pad id is EOS."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    tok = _tokenizer(adds_bos, pad_is_eos=pad_is_eos)
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2ForSequenceClassification(GPT2Config(
            vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=1, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, **ids))
        with torch.no_grad():  # make positions matter clearly
            model.transformer.wpe.weight.normal_(0, 1.0)
    else:
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64, num_labels=1, **ids))
    with torch.no_grad():  # a score head large enough that one token more or less shows
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _scorer(rm: str, policy: str | None = None, micro_batch_size: int = 4):
    from rlhf_ray.workers.frozen import RewardScorer, RewardSpec

    cfg = load_config(None, {"model.path": policy or rm, "reward.kind": "model", "reward.model_path": rm,
                             "reward.micro_batch_size": micro_batch_size})
    return RewardScorer(RewardSpec.from_config(cfg))


def test_left_padded_batch_scores_like_each_sequence_alone(tmp_path):
    from transformers import AutoTokenizer

    rm = _reward_model(tmp_path / "rm")
    scorer = _scorer(rm)
    tok = AutoTokenizer.from_pretrained(rm)
    texts = ["Write the number after 10: 11", "Hi there friend", "a much longer prompt with many words in it", "x y z"]
    rows = [tok(t)["input_ids"] for t in texts]
    batched = scorer._run_model(rows)
    alone = torch.cat([scorer._run_model([r]) for r in rows])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    # Without position_ids the shorter rows would see shifted positions and other scores.
    enc = tok(texts, return_tensors="pt", padding=True)
    assert tok.padding_side == "left"
    with torch.no_grad():
        naive = scorer.model(**enc).logits[:, 0]
    assert (naive - alone).abs().max() > 1e-3


# ---- training and PPO score the same sequences -----------------------------------------------


def _write_jsonl(path, records) -> str:
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def _records(chat: bool) -> tuple[list[dict], list[dict]]:
    """(preference records, PPO prompt records) of PAIRS, as plain text or as chat messages."""
    if not chat:
        return ([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS], [{"prompt": p} for p, _, _ in PAIRS])
    user = [[{"role": "user", "content": p.removeprefix("<s>")}] for p, _, _ in PAIRS]
    return ([{"prompt": u, "chosen": c.strip(), "rejected": r.strip()} for u, (_, c, r) in zip(user, PAIRS)],
            [{"prompt": u} for u in user])


def _rm_training(rm: str, path: str, chat: bool):
    """(trainer, PairBatch): reward-model training's own data loading of ``path`` and its trainer
    role, with the model in place of the DeepSpeed engine (whose forward is the module's)."""
    from transformers import AutoTokenizer

    from rlhf_ray.supervised.config import PreferenceDataConfig, RMRunConfig, TrainModelConfig
    from rlhf_ray.supervised.data import load_preference_data
    from rlhf_ray.supervised.trainer import RewardModelTrainer

    data_cfg = PreferenceDataConfig(train_path=path, eval_fraction=0.0, template="chat" if chat else "plain")
    cfg = RMRunConfig(model=TrainModelConfig(path=rm), data=data_cfg)
    batch = load_preference_data(cfg.data, AutoTokenizer.from_pretrained(rm), cfg.seed).train
    trainer = RewardModelTrainer(cfg, rank=0, world_size=1)
    trainer.engine = trainer._load_model(rm, torch.float32).eval()
    return trainer, batch


def _trained_rewards(trainer, batch) -> list[float]:
    """Rewards of the chosen sides then the rejected sides, by the trainer's loss forward (as in
    its evaluation), one pair at a time."""
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(len(batch)):
            _, stats = trainer._loss(batch.select([i]).trim(), 1.0)
            chosen.append(stats["reward_chosen"].item())
            rejected.append(stats["reward_rejected"].item())
    return chosen + rejected


def _without_last_token(batch, pad_id: int):
    """The pairs with the last token of each side (its EOS) made padding."""
    from rlhf_ray.supervised.data import PairBatch

    sides = []
    for ids, mask in ((batch.chosen_ids, batch.chosen_mask), (batch.rejected_ids, batch.rejected_mask)):
        ids, mask = ids.clone(), mask.clone()
        last = mask.sum(1) - 1
        mask[torch.arange(len(batch)), last] = False
        ids[~mask] = pad_id
        sides += [ids, mask]
    return PairBatch(*sides)


def _ppo_batch(policy_path: str, prompts_path: str, responses: list[str], chat: bool, finished: bool):
    """A PPO batch: every prompt of ``prompts_path`` through PPO's prompt loader, then its response
    tokens as the policy samples them: the text's tokens, then EOS if ``finished``."""
    from transformers import AutoTokenizer

    from rlhf_ray.batch import Generation, pack_generation
    from rlhf_ray.config import DataConfig
    from rlhf_ray.data.prompts import load_prompts

    tok = AutoTokenizer.from_pretrained(policy_path)
    data = DataConfig(prompts=prompts_path, template="chat" if chat else "plain", too_long="error")
    prompt_ids = load_prompts(data, tok, seed=0).token_ids
    response_ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * finished for r in responses]
    n = len(response_ids)
    gen = Generation([prompt_ids[i % len(prompt_ids)] for i in range(n)], response_ids,
                     [[0.0] * len(r) for r in response_ids], ["stop" if finished else "length"] * n, list(range(n)))
    return pack_generation(gen, tok.pad_token_id, [tok.eos_token_id])


@pytest.mark.parametrize("arch,adds_bos,pad_is_eos", [("gpt2", False, False), ("llama", True, False),
                                                      ("llama", True, True)])
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_ppo_scores_a_pair_as_reward_model_training_did(tmp_path, arch, adds_bos, pad_is_eos, chat):
    rm = _reward_model(tmp_path / "rm", arch, adds_bos, pad_is_eos)
    pairs, prompts = _records(chat)
    trainer, trained = _rm_training(rm, _write_jsonl(tmp_path / "pairs.jsonl", pairs), chat)
    prompts_path = _write_jsonl(tmp_path / "prompts.jsonl", prompts)
    scorer = _scorer(rm, micro_batch_size=4)  # the policy has the reward model's tokenizer
    responses = [rec["chosen"] for rec in pairs] + [rec["rejected"] for rec in pairs]
    batch = _ppo_batch(rm, prompts_path, responses, chat, finished=True)
    # The same scores (6 rows in micro-batches of 4) ...
    finished = scorer.score(batch)
    torch.testing.assert_close(finished, torch.tensor(_trained_rewards(trainer, trained)), atol=1e-5, rtol=0)
    # ... because the PPO rows are the training rows, token for token: the batch's ids as they are.
    assert scorer.shares_tokenizer
    rows = scorer.model_inputs(batch)
    assert rows[:3] == [trained.chosen_ids[i][trained.chosen_mask[i]].tolist() for i in range(3)]
    assert rows[3:] == [trained.rejected_ids[i][trained.rejected_mask[i]].tolist() for i in range(3)]
    assert all(r.count(scorer.rm_tokenizer.bos_token_id) == int(adds_bos or chat or i % 3 == 2)
               for i, r in enumerate(rows))  # one BOS at most: never the template's (or file's) and the tokenizer's

    # Cut off before EOS: scored as the training sequence without its EOS, which is another score.
    cut = scorer.score(_ppo_batch(rm, prompts_path, responses, chat, finished=False))
    without_eos = _trained_rewards(trainer, _without_last_token(trained, trainer.pad_id))
    torch.testing.assert_close(cut, torch.tensor(without_eos), atol=1e-5, rtol=0)
    assert (cut - finished).abs().min() > 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_with_pad_equal_to_eos_a_finished_answer_and_a_cut_off_one_score_apart(tmp_path, arch):
    """pad id == EOS: transformers' own pooling reads the last token that is not the pad id, the
    one before a finished answer's EOS, so finished and cut-off answers scored alike in reward-model
    training and in PPO. Both now read the last attended token."""
    rm = _reward_model(tmp_path / "rm", arch, adds_bos=arch == "llama", pad_is_eos=True)
    pairs, prompts = _records(chat=False)
    trainer, trained = _rm_training(rm, _write_jsonl(tmp_path / "pairs.jsonl", pairs), chat=False)
    eos = trainer.pad_id
    assert eos == _eos_id(rm) and trained.chosen_ids[0][trained.chosen_mask[0]].tolist()[-1] == eos
    # Training: each side with its EOS, and the same side without it.
    with_eos = torch.tensor(_trained_rewards(trainer, trained))
    without_eos = torch.tensor(_trained_rewards(trainer, _without_last_token(trained, eos)))
    assert (with_eos - without_eos).abs().min() > 1e-4
    # PPO: the same answers finished (EOS sampled) and cut off at the length limit.
    scorer = _scorer(rm)
    assert scorer.pad_id == eos
    responses = [rec["chosen"] for rec in pairs] + [rec["rejected"] for rec in pairs]
    prompts_path = _write_jsonl(tmp_path / "prompts.jsonl", prompts)
    finished = scorer.score(_ppo_batch(rm, prompts_path, responses, False, finished=True))
    cut = scorer.score(_ppo_batch(rm, prompts_path, responses, False, finished=False))
    assert (finished - cut).abs().min() > 1e-4
    # ... and each is what training gave the same tokens.
    torch.testing.assert_close(finished, with_eos, atol=1e-5, rtol=0)
    torch.testing.assert_close(cut, without_eos, atol=1e-5, rtol=0)


def _eos_id(rm: str) -> int:
    """The reward model's EOS id, checked to be its tokenizer's and its config's pad id."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm)
    assert tok.pad_token_id == tok.eos_token_id == AutoConfig.from_pretrained(rm).pad_token_id
    return tok.eos_token_id


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_a_policy_with_another_tokenizer_is_decoded_and_encoded_as_training_did(tmp_path, chat):
    """Policy ids are decoded with the policy's tokenizer (a different vocabulary) and encoded
    with the reward model's by training's rule: the same ids, the same scores."""
    rm = _reward_model(tmp_path / "rm", "llama", adds_bos=True)
    policy = tmp_path / "policy"
    _tokenizer(adds_bos=False, vocab_size=400).save_pretrained(policy)
    pairs, prompts = _records(chat)
    trainer, trained = _rm_training(rm, _write_jsonl(tmp_path / "pairs.jsonl", pairs), chat)
    scorer = _scorer(rm, policy=str(policy))
    responses = [rec["chosen"] for rec in pairs] + [rec["rejected"] for rec in pairs]
    batch = _ppo_batch(str(policy), _write_jsonl(tmp_path / "prompts.jsonl", prompts), responses, chat, finished=True)
    torch.testing.assert_close(scorer.score(batch), torch.tensor(_trained_rewards(trainer, trained)), atol=1e-5,
                               rtol=0)
    assert not scorer.shares_tokenizer
    rows = scorer.model_inputs(batch)
    assert rows[:3] == [trained.chosen_ids[i][trained.chosen_mask[i]].tolist() for i in range(3)]
    assert rows[3:] == [trained.rejected_ids[i][trained.rejected_mask[i]].tolist() for i in range(3)]


@pytest.mark.parametrize("packing", [True, False])
def test_reference_logprobs_skip_the_prompt_and_match_the_full_model(tmp_path, packing):
    """The reference role asks the LM head for the response positions only; the logprobs are
    those of a full forward pass of each sequence alone, on a batch with left-padded prompts and
    right-padded responses, padded or packed without padding."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.batch import Generation, pack_generation
    from rlhf_ray.tiny_models import build_tiny_model
    from rlhf_ray.workers.frozen import ReferenceModel, ReferenceSpec

    path = str(build_tiny_model(tmp_path / "ref", arch="llama", seed=3))
    cfg = load_config(None, {"model.path": path, "reference.micro_batch_size": 2, "reference.packing": packing})
    ref = ReferenceModel(ReferenceSpec.from_config(cfg))
    assert ref._keeps_logits  # Llama takes logits_to_keep: the short path is the one tested
    gen = Generation(prompt_ids=[[5, 6, 7, 8], [9, 10], [11, 12, 13]],
                     response_ids=[[20, 21], [22, 23, 24, 25], [26]],
                     logprobs=[[0.0] * 2, [0.0] * 4, [0.0]], finish_reasons=["length"] * 3,
                     prompt_index=[0, 1, 2])
    batch = pack_generation(gen, pad_id=0)
    got = ref.logprobs(batch, temperature=0.7)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    for row, (p_ids, r_ids) in enumerate(zip(gen.prompt_ids, gen.response_ids)):
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logp = torch.log_softmax(plain(input_ids=ids).logits[0].float() / 0.7, dim=-1)
        expected = [logp[len(p_ids) - 1 + t, tok].item() for t, tok in enumerate(r_ids)]
        torch.testing.assert_close(got[row, :len(r_ids)], torch.tensor(expected), atol=1e-5, rtol=0)
        assert torch.all(got[row, len(r_ids):] == 0)  # padding positions stay 0
