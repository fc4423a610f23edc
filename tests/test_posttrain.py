"""Post-training: the chat template, SFT rows and their loss weights, DPO and reward losses against
hand computations; and, in a subprocess on 8 fake devices, a DPO run through the trainer that starts at
ln 2 and resumes exactly, a PPO run that resumes exactly, runs pointed at the wrong checkpoints, and
a DPO step that matches the 1-device one (lmjax/posttrain)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import default_config
from lmjax.data.tokenizers import ByteTokenizer
from lmjax.model import Transformer
from lmjax.posttrain import batches, chat, dataset, losses
from lmjax.posttrain import init as init_lib
from lmjax.posttrain import ppo
from lmjax.posttrain import config as pt_config
from lmjax.posttrain.reward_model import RewardModel
from lmjax.train import step as step_lib

BYTE = ByteTokenizer()  # ids 0..255 bytes, pad 256, bos 257, eos 258: specials are 259..262
SYSTEM, USER, ASSISTANT, END = 259, 260, 261, 262
SEQ_LEN = 24
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jit(fun):
    """jax.jit at LLVM -O0: XLA's CPU compile takes half the time, the results are the same."""
    return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 0})


def tiny_config():
    c = default_config()
    c.model.update(num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=2, max_len=32, vocab_size=263)
    c.data.update(tokenizer="byte", seq_len=SEQ_LEN)
    c.train.update(batch_size=4, steps=4)
    c.optim.update(warmup_steps=0, schedule="constant", lr=1e-3)
    return c


def unboxed_init(model, seed):
    init = jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]))
    return init(jax.random.PRNGKey(seed))


@pytest.fixture(scope="module")
def lm():
    c = tiny_config()
    model = Transformer(c.model)
    return c, model, unboxed_init(model, 0)


@pytest.fixture(scope="module")
def sft_grad(lm):
    """(rows of 4 x SEQ_LEN) -> (loss, grads) of the SFT loss: one compiled program for every test."""
    c, model, params = lm
    fn = jit(jax.value_and_grad(step_lib.lm_loss_sums_fn(c, model), has_aux=True))

    def loss_and_grads(rows):
        rows = {k: np.concatenate([v, np.zeros((4 - len(v), *v.shape[1:]), v.dtype)]) for k, v in rows.items()}
        (_, sums), grads = fn(params, rows, jax.random.PRNGKey(0), 0)
        return float(sums["loss_sum"] / sums["weight_sum"]), grads

    return loss_and_grads


# --- the chat template ---------------------------------------------------------------------------


def test_template_ids_and_weights():
    template = chat.ChatTemplate(BYTE)
    assert template.vocab_size == 263 and template.end_id == END
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok"}]
    ids, weights = template.encode(messages)
    assert ids.tolist() == [258, SYSTEM, 115, END, USER, 104, 105, END, ASSISTANT, 111, 107, END]
    assert weights.tolist() == [0] * 9 + [1, 1, 1]
    _, weights = template.encode(messages, prompt_loss_weight=0.25)
    assert weights.tolist() == [0.25] * 9 + [1, 1, 1]
    assert template.prompt_ids(messages[:2]) == [258, SYSTEM, 115, END, USER, 104, 105, END, ASSISTANT]
    assert template.decode(ids[1:]) == "<|system|>s<|end|><|user|>hi<|end|><|assistant|>ok<|end|>"


def test_every_assistant_turn_is_learned():
    messages = chat.conversation("a", "b") + [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ids, weights = chat.ChatTemplate(BYTE).encode(messages)
    assert [int(i) for i, w in zip(ids, weights) if w] == [ord("b"), END, ord("d"), END]


def test_bad_examples_are_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2=", "chosen": "4", "rejected": " "}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl, line 2: 'rejected' is empty"):
        dataset.read_jsonl(str(path), "pairs")
    path.write_text('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    with pytest.raises(ValueError, match=r"line 1: message 0: role 'robot'"):
        dataset.read_jsonl(str(path), "sft")
    path.write_text('{"prompt": "x", "response": "y"\n')
    with pytest.raises(ValueError, match=r"line 1: not JSON"):
        dataset.read_jsonl(str(path), "sft")


def test_conversation_longer_than_the_context_is_refused():
    examples = [{"messages": chat.conversation("x" * 30, "y")}]
    with pytest.raises(ValueError, match=r"conversation 0 is 36 tokens, longer than the context: data.seq_len=24"):
        batches.sft_rows(chat.ChatTemplate(BYTE), examples, SEQ_LEN, pad_id=BYTE.pad_id)


def test_pair_longer_than_the_context_is_refused():
    pairs = [{"prompt": chat.conversation("1+1="), "chosen": "2", "rejected": "3"},
             {"prompt": chat.conversation("2+2="), "chosen": "4", "rejected": "no" * 10}]
    with pytest.raises(ValueError, match=r"pair 1: prompt \+ rejected response is 29 tokens, longer than the context: data.seq_len=24"):
        batches.pair_rows(chat.ChatTemplate(BYTE), pairs, SEQ_LEN, pad_id=BYTE.pad_id)


# --- SFT: packing and loss weights ---------------------------------------------------------------


EXAMPLES = [{"messages": chat.conversation(p, r)} for p, r in [("1+2=", "3"), ("10+5=", "15"), ("7+7=", "14"), ("0+9=", "9")]]


def test_packing_puts_whole_conversations_in_segments():
    rows = batches.sft_rows(chat.ChatTemplate(BYTE), EXAMPLES, SEQ_LEN, pad_id=BYTE.pad_id)
    assert len(rows["inputs"]) == 2  # 4 conversations of 9-11 positions in rows of 24
    first = rows["segment_ids"][0]
    assert sorted(set(first.tolist())) == [0, 1, 2]
    for segment in (1, 2):  # positions restart in each segment
        assert rows["positions"][0][first == segment].tolist() == list(range(int(np.sum(first == segment))))
    assert rows["weights"][rows["segment_ids"] == 0].sum() == 0
    # Learned targets: each answer's digits and <|end|>, nothing else.
    learned = sorted(rows["targets"][rows["weights"] > 0].tolist())
    assert learned == sorted([ord(ch) for ch in "315149"] + [END] * 4)


def test_prompt_targets_get_exactly_zero_gradient(sft_grad):
    rows = batches.sft_rows(chat.ChatTemplate(BYTE), EXAMPLES, SEQ_LEN, pad_id=BYTE.pad_id)
    prompt_positions = np.argwhere((rows["weights"] == 0) & (rows["segment_ids"] > 0))
    r, t = prompt_positions[3]
    perturbed = {k: v.copy() for k, v in rows.items()}
    perturbed["targets"][r, t] = (perturbed["targets"][r, t] + 7) % 256
    loss, grads = sft_grad(rows)
    loss_p, grads_p = sft_grad(perturbed)
    assert loss == loss_p
    jax.tree.map(np.testing.assert_array_equal, grads, grads_p)
    # The same perturbation with prompt_loss_weight > 0 does change the loss: the check can fail.
    weighted = batches.sft_rows(chat.ChatTemplate(BYTE), EXAMPLES, SEQ_LEN, pad_id=BYTE.pad_id, prompt_loss_weight=0.5)
    weighted_p = {**weighted, "targets": perturbed["targets"]}
    assert sft_grad(weighted)[0] != sft_grad(weighted_p)[0]


def test_unpacked_prompt_and_padding_targets_get_exactly_zero_gradient(sft_grad):
    """One conversation a row: changing a prompt target and every padding input and target changes
    neither the loss nor any gradient, bit for bit."""
    rows = batches.sft_rows(chat.ChatTemplate(BYTE), EXAMPLES, SEQ_LEN, pad_id=BYTE.pad_id, pack=False)
    padding = rows["segment_ids"] == 0
    assert padding.sum() > 0 and rows["weights"][padding].sum() == 0
    r, t = np.argwhere((rows["weights"] == 0) & ~padding)[2]
    perturbed = {k: v.copy() for k, v in rows.items()}
    perturbed["targets"][r, t] = (perturbed["targets"][r, t] + 7) % 256
    perturbed["inputs"][padding], perturbed["targets"][padding] = ord("A"), ord("B")
    loss, grads = sft_grad(rows)
    loss_p, grads_p = sft_grad(perturbed)
    assert loss == loss_p
    jax.tree.map(np.testing.assert_array_equal, grads, grads_p)
    # A response target is learned: changing one does change the loss.
    r, t = np.argwhere(rows["weights"] > 0)[0]
    learned = {**rows, "targets": rows["targets"].copy()}
    learned["targets"][r, t] = (learned["targets"][r, t] + 7) % 256
    assert sft_grad(learned)[0] != loss


def test_packed_and_unpacked_give_the_same_loss_and_gradient(sft_grad):
    template = chat.ChatTemplate(BYTE)
    packed = batches.sft_rows(template, EXAMPLES, SEQ_LEN, pad_id=BYTE.pad_id, pack=True)
    unpacked = batches.sft_rows(template, EXAMPLES, SEQ_LEN, pad_id=BYTE.pad_id, pack=False)
    assert len(packed["inputs"]) == 2 and len(unpacked["inputs"]) == 4
    loss_packed, grads_packed = sft_grad(packed)
    loss_unpacked, grads_unpacked = sft_grad(unpacked)
    assert loss_packed == pytest.approx(loss_unpacked, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads_packed, grads_unpacked)


# --- DPO and the reward model ---------------------------------------------------------------------


PAIRS = [{"prompt": chat.conversation(p), "chosen": a, "rejected": b}
         for p, a, b in [("1+2=", "3", "4"), ("10+5=", "15", "13"), ("7+7=", "14", "9"), ("0+9=", "9", "10")]]


def test_sequence_logp_is_the_sum_of_response_token_logps(lm):
    c, model, params = lm
    template = chat.ChatTemplate(BYTE)
    rows = batches.pair_rows(template, PAIRS, SEQ_LEN, pad_id=BYTE.pad_id)
    # By hand: the full forward of "prompt + chosen" alone, log-softmax, and the response's tokens.
    ids, weights = template.encode([*PAIRS[1]["prompt"], {"role": "assistant", "content": "15"}])
    both = jit(lambda p, rows, alone: (losses.pair_logps_fn(model)(p, rows, jax.random.PRNGKey(0)),
                                       model.apply({"params": p}, alone)))
    got, logits = both(params, rows, ids[None, :-1])
    got, logits = np.asarray(got), np.asarray(logits, np.float64)[0]
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) - logits.max(-1, keepdims=True)
    response = [t for t in range(1, len(ids)) if weights[t] > 0]
    assert [int(ids[t]) for t in response] == [ord("1"), ord("5"), END]
    by_hand = sum(log_probs[t - 1, ids[t]] for t in response)
    assert got[1, 0] == pytest.approx(by_hand, abs=1e-4)


def test_dpo_and_ipo_losses_by_hand():
    logratio = jnp.array([[0.5, -0.25], [-1.0, 2.0], [0.0, 0.0]])
    h = np.array([0.75, -3.0, 0.0])
    np.testing.assert_allclose(losses.dpo_losses(logratio, 0.1), np.log1p(np.exp(-0.1 * h)), rtol=1e-6)
    np.testing.assert_allclose(losses.dpo_losses(logratio, 0.1, "ipo"), (h - 5.0) ** 2, rtol=1e-6)
    assert float(losses.dpo_losses(logratio, 0.1)[2]) == np.float32(math.log(2))


def test_bradley_terry_loss_by_hand():
    rewards = jnp.array([[1.5, 0.5], [-0.2, 0.3]])
    np.testing.assert_allclose(losses.bradley_terry_losses(rewards),
                               [-np.log(1 / (1 + np.exp(-1.0))), -np.log(1 / (1 + np.exp(0.5)))], rtol=1e-6)


def test_reward_is_the_head_at_the_last_response_token(lm):
    c, model, lm_params = lm
    reward_model = RewardModel(c.model)
    rows = batches.pair_rows(chat.ChatTemplate(BYTE), PAIRS, SEQ_LEN, pad_id=BYTE.pad_id)
    tokens, weights = rows["inputs"].reshape(-1, SEQ_LEN), rows["weights"].reshape(-1, SEQ_LEN)
    head = {"kernel": np.random.default_rng(2).normal(0, 1, (32, 1)).astype(np.float32), "bias": np.float32([0.3])}
    params = {"transformer": lm_params, "reward_head": head}  # a language model's trunk loads as it is
    loss_fn = losses.reward_loss_sums_fn(pt_config.default_config("reward"), reward_model)
    forward = jit(lambda p, rows, t, w: (reward_model.apply({"params": p}, t, w),
                                         model.apply({"params": p["transformer"]}, t, features=True),
                                         loss_fn(p, rows, jax.random.PRNGKey(0), 0)[1]))
    rewards, h, sums = forward(params, rows, tokens, weights)
    rewards = np.asarray(rewards)
    for row in (0, 3, 7):
        last = int(np.flatnonzero(weights[row])[-1])  # its input is the response's last character
        assert tokens[row, last] in b"0123456789"
        expected = np.asarray(h[row, last]) @ np.asarray(head["kernel"])[:, 0] + float(head["bias"][0])
        assert rewards[row] == pytest.approx(expected, abs=1e-5)
    pairs = rewards.reshape(-1, 2)
    assert float(sums["loss_sum"]) == pytest.approx(np.sum(np.log1p(np.exp(-(pairs[:, 0] - pairs[:, 1])))), rel=1e-5)
    assert float(sums["accuracy_sum"]) == np.sum(pairs[:, 0] > pairs[:, 1])


def test_reward_centring_and_padding_pairs_by_hand(lm):
    """objective = sum of Bradley-Terry losses + reward.center * sum (r_chosen + r_rejected)^2 over the
    real pairs; a padding pair (no weighted token, e.g. filling an eval batch) counts nowhere."""
    c, model, lm_params = lm
    reward_model = RewardModel(c.model)
    config = pt_config.default_config("reward")
    config.reward.center = 0.5
    rows = batches.pair_rows(chat.ChatTemplate(BYTE), PAIRS[:3], SEQ_LEN, pad_id=BYTE.pad_id)
    rows = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in rows.items()}  # a 4th, padding pair
    head = {"kernel": np.random.default_rng(3).normal(0, 1, (32, 1)).astype(np.float32), "bias": np.float32([0.3])}
    params = {"transformer": lm_params, "reward_head": head}
    loss_fn = losses.reward_loss_sums_fn(config, reward_model)
    flat = lambda x: x.reshape(-1, SEQ_LEN)  # noqa: E731
    both = jit(lambda p, rows: (loss_fn(p, rows, jax.random.PRNGKey(0), 0),
                                reward_model.apply({"params": p}, flat(rows["inputs"]), flat(rows["weights"]))))
    (objective, sums), rewards = both(params, rows)
    pairs = np.asarray(rewards, np.float64).reshape(-1, 2)[:3]
    bradley_terry = np.sum(np.log1p(np.exp(-(pairs[:, 0] - pairs[:, 1]))))
    assert float(sums["loss_sum"]) == pytest.approx(bradley_terry, rel=1e-5)
    assert float(objective) == pytest.approx(bradley_terry + 0.5 * np.sum((pairs[:, 0] + pairs[:, 1]) ** 2), rel=1e-5)
    assert float(sums["weight_sum"]) == 3.0
    assert float(sums["accuracy_sum"]) == np.sum(pairs[:, 0] > pairs[:, 1])
    assert float(sums["reward_mean_sum"]) == pytest.approx(np.sum(pairs.mean(axis=1)), rel=1e-5, abs=1e-6)


# --- the trainer, on 8 fake devices (tests/posttrain_check.py) ------------------------------------


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """The results of tests/posttrain_check.py (one subprocess for every end-to-end test below)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # halves compile time; same results
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "posttrain_check.py"),
                           str(tmp_path_factory.mktemp("posttrain"))], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("JSON:"))
    return json.loads(line[len("JSON:"):])


@pytest.mark.slow
def test_dpo_run_starts_at_ln2(check):
    first = check["trainer"]["first"]
    assert check["trainer"]["devices"] == 8
    assert first[0]["step"] == 0 and first[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first[0]["val_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert first[1]["step"] == 1 and first[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step-0 params
    # The reference stays the step-0 model: once the policy has moved, the loss is no longer ln 2.
    assert abs(first[2]["loss"] - math.log(2)) > 1e-3


@pytest.mark.slow
def test_dpo_run_resumes_exactly(check):
    """Step 4's checkpoint deleted (a run killed after step 2): the resumed steps 3 and 4 match."""
    assert check["trainer"]["saved_steps"] == [2, 4]
    first = {r["step"]: r for r in check["trainer"]["first"]}
    resumed = {r["step"]: r for r in check["trainer"]["resumed"]}
    assert sorted(resumed) == sorted(first)
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(first[step]["loss"], rel=1e-6)
    assert resumed[4]["val_accuracy"] == first[4]["val_accuracy"]


@pytest.mark.slow
def test_dpo_resumed_run_is_the_uninterrupted_run(check):
    """Every logged number (evaluations included) and the final parameters, bit for bit."""
    assert check["trainer"]["resumed"] == check["trainer"]["first"]
    assert check["trainer"]["max_param_diff"] == 0.0


@pytest.mark.slow
def test_ppo_run_resumes_exactly(check):
    """Step 4's checkpoint deleted (a PPO run killed after step 2): the resumed steps 3 and 4 sample
    the same responses and get the same rewards, KL, KL coefficient and losses, bit for bit, and end
    at the same parameters."""
    resume = check["ppo_resume"]
    assert resume["saved_steps"] == [2, 4]
    first = {r["step"]: r for r in resume["first"]}
    resumed = {r["step"]: r for r in resume["resumed"]}
    assert sorted(first) == sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == first[step]
    # The coefficient adapts every step (ppo.kl_target > 0), so only a restored one matches.
    assert first[3]["kl_coef"] < first[2]["kl_coef"] < first[1]["kl_coef"] == 0.05
    assert first[3]["policy_loss"] != first[4]["policy_loss"]  # the steps differ: equality is not vacuous
    assert resume["max_param_diff"] == 0.0
    summary = resume["summary"]
    assert summary["completed"] and summary["steps"] == 4
    assert summary["final"] == {k: v for k, v in first[4].items() if k != "step"}


@pytest.mark.slow
def test_init_from_another_model_is_refused(check):
    assert "holds a different model: model.embed_dim: checkpoint 32, config 64" in check["other_model_error"]


@pytest.mark.slow
def test_wrong_reward_or_init_checkpoints_are_named(check):
    errors = check["bad_sources"]
    assert "config.ppo.reward_from=" in errors["reward_of_another_shape"]
    assert "holds a model of another shape than --init_from" in errors["reward_of_another_shape"]
    assert "(model.embed_dim: 64 there, 32 here)" in errors["reward_of_another_shape"]
    assert errors["reward_is_a_language_model"].endswith(
        "/init holds a language model, not a reward model: point it at the workdir of a --mode=reward run")
    assert errors["reward_missing"].startswith("FileNotFoundError: config.ppo.reward_from=")
    assert "/nothing: no checkpoint in" in errors["reward_missing"]
    assert errors["init_is_a_reward_model"].startswith("ValueError: --init_from=")
    assert errors["init_is_a_reward_model"].endswith("/reward holds a reward model, not a language model: "
                                                     "start from a pretraining, SFT or DPO run")
    assert errors["prompt_too_long"].endswith(
        "is 10 tokens: with config.ppo.max_new_tokens=20 it does not fit data.seq_len=24")
    assert errors["workdirs_written"] == []  # every check comes before the first file


@pytest.mark.slow
def test_ppo_starts_with_the_policy_equal_to_its_reference(check):
    first, second = check["ppo"]
    assert first["step"] == 1 and second["step"] == 2
    # The rollouts of step 1 are scored before any update: policy and reference log-probs are
    # bitwise equal, so both KL estimators are exactly 0.
    assert first["max_abs_policy_ref_logp_diff"] == 0.0
    assert first["kl_k1"] == 0.0 and first["kl_k3"] == 0.0
    # After step 1's updates the policy has moved, and the KL says so (k3 >= 0 always).
    assert second["max_abs_policy_ref_logp_diff"] > 0 and second["kl_k3"] > 0
    assert all(math.isfinite(second[k]) for k in ("loss", "policy_loss", "value_loss", "score", "kl_coef"))


@pytest.mark.slow
def test_dpo_step_on_8_devices_matches_one(check):
    single, sharded = check["steps"]["dpo"]["single"], check["steps"]["dpo"]["data2_fsdp4"]
    for a, b in zip(single["metrics"], sharded["metrics"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert single["metrics"][1]["loss"] != single["metrics"][0]["loss"]  # the steps did train
    assert check["steps"]["dpo"]["max_param_diff"] < 1e-5
    assert single["embedding_shard"] == [263, 32] and sharded["embedding_shard"] == [263, 8]  # embed over fsdp=4


# --- starting a run ---------------------------------------------------------------------------------


def test_grown_vocabulary_rows_start_at_the_mean_row():
    embedding = np.arange(12, dtype=np.float32).reshape(3, 4)
    head = embedding.T.copy()
    grown = init_lib.grow_vocab({"embedding": embedding, "head": head, "block_0": {"embedding": embedding}}, 5)
    np.testing.assert_array_equal(grown["embedding"][:3], embedding)
    np.testing.assert_array_equal(grown["embedding"][3:], [[4, 5, 6, 7]] * 2)
    np.testing.assert_array_equal(grown["head"], grown["embedding"].T)
    assert grown["block_0"]["embedding"].shape == (3, 4)  # only the top-level tables are vocabularies


def test_bad_posttrain_keys_are_named():
    c = pt_config.default_config("dpo")
    c.dpo.loss = "hinge"
    with pytest.raises(ValueError, match=r"config.dpo.loss='hinge' is not valid; choose one of: sigmoid, ipo"):
        pt_config.check(c, "dpo")
    with pytest.raises(ValueError, match=r"--mode='kto'"):
        pt_config.check(pt_config.default_config("sft"), "kto")
    with pytest.raises(ValueError, match=r"--mode=ppo needs config.ppo.reward_from"):
        pt_config.check(pt_config.default_config("ppo"), "ppo")


@pytest.mark.parametrize("module", ["lmjax.posttrain", "lmjax.main"])
def test_command_line_names_a_missing_init_checkpoint(tmp_path, module):
    """`python -m lmjax.main --mode=sft ...` is `python -m lmjax.posttrain --mode=sft ...`, errors included."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--mode=sft", "--config=configs/posttrain/sft.py",
         f"--init_from={tmp_path}/nothing", f"--workdir={tmp_path}/sft"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert f"error: --init_from={tmp_path}/nothing: no checkpoint in {tmp_path}/nothing/checkpoints" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_a_pretraining_config_for_a_posttrain_mode_is_named():
    from lmjax import config as config_lib

    with pytest.raises(ValueError, match=r"the config has no posttrain, sft, dpo, reward, ppo section: --mode=dpo "
                                         r"needs a post-training preset, e.g. configs/posttrain/dpo.py"):
        pt_config.check(config_lib.load("configs/gpt_small.py"), "dpo")


# --- PPO's arithmetic --------------------------------------------------------------------------------


def test_gae_matches_a_reference_loop():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=(3, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], np.float32)
    gamma, lam = 0.9, 0.8
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        n = int(mask[b].sum())
        expected, running = np.zeros(6), 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            running = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * running
            expected[t] = running
        np.testing.assert_allclose(advantages[b], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(returns[b, :n], expected[:n] + values[b, :n], rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(returns[b, n:]) == 0)


def test_clipped_objective_at_ratio_1_is_the_policy_gradient():
    rng = np.random.default_rng(1)
    logp = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    advantages = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], jnp.float32)
    clipped = jax.grad(lambda lp: ppo.clipped_policy_loss_sum(lp, logp, advantages, mask, 0.2))(logp)
    plain = jax.grad(lambda lp: -jnp.sum(advantages * lp * mask))(logp)
    np.testing.assert_allclose(clipped, plain, rtol=1e-6)
    # Away from ratio 1 the clip binds: a ratio of e^0.5 with a positive advantage has no gradient.
    far = jax.grad(lambda lp: ppo.clipped_policy_loss_sum(lp, logp, jnp.ones_like(logp), mask, 0.2))(logp + 0.5)
    assert float(jnp.abs(far).sum()) == 0.0


def test_kl_estimators_and_rewards_by_hand():
    logp = jnp.array([[-1.0, -2.0, -0.5]])
    k1, k3 = ppo.kl_estimates(logp, logp)
    assert float(jnp.abs(k1).sum()) == 0.0 and float(jnp.abs(k3).sum()) == 0.0  # policy == reference
    ref = jnp.array([[-1.5, -1.0, -0.5]])
    k1, k3 = ppo.kl_estimates(logp, ref)
    np.testing.assert_allclose(k1, [[0.5, -1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(k3, [[np.exp(-0.5) - 1 + 0.5, np.exp(1.0) - 1 - 1.0, 0.0]], rtol=1e-6)
    rewards = ppo.token_rewards(jnp.array([2.0]), logp, ref, jnp.array([[1.0, 1.0, 0.0]]), 0.1)
    np.testing.assert_allclose(rewards, [[-0.05, 2.0 + 0.1, 0.0]], rtol=1e-6)
    controller = ppo.AdaptiveKLController(coef=0.1, target=6.0, horizon=100)
    assert controller.update(kl=12.0, steps=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped to 0.2
    assert controller.update(kl=5.4, steps=10) == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))


STDLIB_LIKE = '''
import os


class Chunk:
    def getname(self):
        """Return the name."""
        return self.name

    def skipped_no_docstring(self):
        return 1

    def skipped_docstring_only(self):
        """Nothing else."""


async def fetch(url,
                timeout=3):
    """Fetch `url`.

    Waits at most `timeout` seconds.
    """

    # a comment, then code
    return await get(url, timeout)
'''


def test_stdlib_functions_split_into_signature_and_body(tmp_path, monkeypatch):
    from lmjax.posttrain import stdlib

    examples = stdlib.function_examples(STDLIB_LIKE)
    assert [e["prompt"].splitlines()[0] for e in examples] == ["def getname(self):", "async def fetch(url,"]
    method, function = examples
    assert method == {"prompt": 'def getname(self):\n    """Return the name."""\n', "response": "    return self.name\n"}
    assert function["prompt"] + function["response"] == STDLIB_LIKE[STDLIB_LIKE.index("async def"):]
    assert function["response"].startswith("\n    # a comment")
    assert all(stdlib.parses(e["prompt"], e["response"]) for e in examples)
    assert not stdlib.parses(method["prompt"], "    return (self.name\n")  # the judge rejects broken code
    assert not stdlib.parses(method["prompt"], "")  # ...and a body that is only the docstring
    assert not stdlib.parses(method["prompt"], "    return 1\nx = 2\n")  # ...and code past the function

    # Split by file as the pystdlib source splits; a function copied into a training file leaves validation.
    copy = "def copied(x):\n    \"\"\"Twice.\"\"\"\n    return 2 * x\n"
    files = {"a.py": copy, "b.py": STDLIB_LIKE, "c.py": copy + "\n\n" + STDLIB_LIKE.replace("getname", "name")}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(stdlib.sources, "pystdlib_root", lambda: str(tmp_path))
    monkeypatch.setattr(stdlib.sources, "pystdlib_split_files",
                        lambda split, fraction: ["a.py", "b.py"] if split == "train" else ["c.py"])
    train, validation = stdlib.train_and_validation(0.5)
    assert [e["prompt"].split("(")[0] for e in train] == ["def copied", "def getname", "async def fetch"]
    assert [e["prompt"].split("(")[0] for e in validation] == ["def name"]
