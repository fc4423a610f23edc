"""The evaluation harness: scores equal hand-computed log-likelihoods, padding and batching never change
them, k-shot prompts never show the evaluated example, BIG-bench tasks parse and score, bad input fails
clearly; and the induction score and the key->value task of lmjax.evals.induction."""

from __future__ import annotations

import json
import pathlib
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import forward, init, tiny_cfg

from lmjax import config as config_lib
from lmjax.data.tokenizers import CharTokenizer
from lmjax.evals import (
    Example,
    Scorer,
    Task,
    TooLongError,
    harness,
    induction,
    load_tasks,
    prompts,
    split_tokens,
)
from lmjax.evals.scoring import edit_distance
from lmjax.model import quantization as quant_lib
from lmjax.train import checkpointing
from lmjax.train import step as step_lib
from lmjax.train import workdir as workdir_lib
from lmjax.train.state import TrainState

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "bigbench"
CHARS = sorted(set(string.printable))
MAX_LEN = 64


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer(CHARS)  # every id is one printable character, so any output round-trips


@pytest.fixture(scope="module")
def cfg(tokenizer):
    return tiny_cfg(vocab_size=tokenizer.vocab_size, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def params(cfg):
    return init(cfg)


@pytest.fixture(scope="module")
def scorer(cfg, params, tokenizer):
    return Scorer(cfg, params, tokenizer, batch_size=8)


def exact_log_probs(cfg, params, rows):
    """log_softmax of the full forward pass over unpadded rows of one length: [B, L, V] in numpy."""
    logits = forward(cfg, params, np.asarray(rows, np.int32))
    return np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)


def log_probs(cfg, params, ids):
    """[len(ids), V] log-probabilities from one forward pass over `ids` right-padded to MAX_LEN (one
    compile for every length; causality, proven in test_model, makes the padding irrelevant)."""
    row = np.zeros((1, MAX_LEN), np.int32)
    row[0, : len(ids)] = ids
    return exact_log_probs(cfg, params, row)[0, : len(ids)]


def by_hand(cfg, params, context_ids, continuation_ids, lp=None):
    """(sum of log p(continuation token | everything before it), whether each is the argmax)."""
    ids = list(context_ids) + list(continuation_ids)
    lp = log_probs(cfg, params, ids[:-1]) if lp is None else lp
    positions = range(len(context_ids) - 1, len(ids) - 1)
    total = sum(lp[t, ids[t + 1]] for t in positions)
    return total, all(int(np.argmax(lp[t])) == ids[t + 1] for t in positions)


def greedy_by_hand(cfg, params, ids, n):
    """n argmax tokens after `ids`, each from a full forward pass (no KV cache)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(log_probs(cfg, params, ids)[len(ids) - 1])))
    return ids[-n:]


# Four requests of 16 characters each: the hand computation is one unpadded [4, 16] forward pass.
REQUESTS = [("Q: 2+2=? A:", " four"), ("The cat sat", " on a"), ("abc", "defghijklmnop"), ("x", "yyyyyyyyyyyyyyy")]


def test_loglikelihoods_equal_the_full_forward_by_hand(cfg, params, tokenizer, scorer):
    scores = scorer.loglikelihoods([[r] for r in REQUESTS])
    rows = [[tokenizer.eos_id] + tokenizer.encode(c + x) for c, x in REQUESTS]
    lp_BxLxV = exact_log_probs(cfg, params, [row[:-1] for row in rows])
    for (context, continuation), (score,), lp in zip(REQUESTS, scores, lp_BxLxV):
        context_ids = [tokenizer.eos_id] + tokenizer.encode(context)
        continuation_ids = tokenizer.encode(continuation)
        expected, greedy = by_hand(cfg, params, context_ids, continuation_ids, lp)
        assert score.logprob == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert score.num_tokens == len(continuation)
        assert score.is_greedy == greedy
        ids = context_ids + continuation_ids
        assert score.argmax_hits == tuple(int(np.argmax(lp[t])) == ids[t + 1]
                                          for t in range(len(context_ids) - 1, len(ids) - 1))
    assert scores[0][0].logprob < -1


def test_a_score_is_the_same_alone_and_in_a_padded_batch(cfg, params, tokenizer, scorer):
    alone = Scorer(cfg, params, tokenizer, batch_size=1)
    short = ("x", "y")  # alone: a 1-row batch of length 16; batched: next to a 40-token row
    (single,), = alone.loglikelihoods([[short]])
    batched = scorer.loglikelihoods([[short, ("a" * 30, "b" * 10), ("cd", "e")]])[0]
    assert batched[0].logprob == pytest.approx(single.logprob, rel=1e-6, abs=1e-6)
    expected, _ = by_hand(cfg, params, [tokenizer.eos_id] + tokenizer.encode("x"), tokenizer.encode("y"))
    assert single.logprob == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_choices_of_one_context_share_a_batch_and_small_groups_share_one(scorer, monkeypatch):
    calls = []
    original = scorer._score_rows
    monkeypatch.setattr(scorer, "_score_rows", lambda rows: calls.append(len(rows)) or original(rows))
    groups = [[("Q", " a"), ("Q", " b"), ("Q", " c")], [("R", " a")], [("S", " a"), ("S", " b")],
              [("T", str(i)) for i in range(6)], [("U", str(i)) for i in range(9)]]
    scores = scorer.loglikelihoods(groups)
    assert calls == [6, 6, 9]  # {3, 1, 2}, {6} (it would overflow 8 rows), {9}: a group is never split
    assert [len(s) for s in scores] == [3, 1, 2, 6, 9]
    assert scores[4][3].logprob == pytest.approx(scorer.loglikelihoods([[("U", "3")]])[0][0].logprob, rel=1e-6)


class MergingTokenizer:
    """Greedy longest match over a vocabulary with the merge 'ab': 'x' + 'abc' splits inside a token."""

    pieces = ("ab", "a", "b", "c", "x", "y")
    eos_id = len(pieces)

    def encode(self, text):
        ids, i = [], 0
        while i < len(text):
            piece = next(p for p in self.pieces if text.startswith(p, i))
            ids.append(self.pieces.index(piece))
            i += len(piece)
        return ids

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids if i < len(self.pieces))


def test_context_and_continuation_are_tokenized_together_and_split_at_the_boundary():
    tok = MergingTokenizer()
    context_ids, continuation_ids = split_tokens(tok, "xya", "bc")
    # Alone "xya" ends with 'a'; joined, 'ab' straddles the boundary and goes to the continuation.
    assert tok.decode(context_ids[1:]) == "xy" and context_ids[0] == tok.eos_id
    assert [tok.pieces[i] for i in continuation_ids] == ["ab", "c"]
    assert split_tokens(tok, "xy", "abc")[1] == tok.encode("abc")


def test_a_long_prompt_is_cut_from_the_left_and_a_too_long_continuation_is_an_error(cfg, params, tokenizer):
    scorer = Scorer(cfg, params, tokenizer, batch_size=1)
    context, continuation = "0123456789" * 8, " the end"
    (score,), = scorer.loglikelihoods([[(context, continuation)]])
    assert scorer.truncated == 1
    continuation_ids = tokenizer.encode(continuation)
    kept = ([tokenizer.eos_id] + tokenizer.encode(context))[-(MAX_LEN + 1 - len(continuation_ids)):]
    expected, _ = by_hand(cfg, params, kept, continuation_ids)
    assert score.logprob == pytest.approx(expected, rel=1e-5, abs=1e-5)
    with pytest.raises(TooLongError, match="continuation of 70 tokens"):
        scorer.loglikelihoods([[("a", "b" * 70)]])


def numbered_task(n=20, duplicates=(3, 7, 11)):
    """Inputs that are never substrings of each other; examples 3, 7 and 11 share one input."""
    examples = [Example(f"<{'dup' if i in duplicates else i}>", (f"t{i}",)) for i in range(n)]
    return Task("numbered", tuple(examples), ("exact_str_match",))


def test_k_shot_prompts_never_contain_the_evaluated_example_and_are_reproducible():
    task = numbered_task()
    for k in (1, 3, 5):
        for i, ex in enumerate(task.examples):
            shots = prompts.shot_indices(task, i, k, seed=0)
            assert len(set(shots)) == k and i not in shots
            assert all(task.examples[j].input != ex.input for j in shots)
            text = prompts.prompt(task, i, k, seed=0, multiple_choice=False)
            assert text.count(ex.input) == 1 and text.endswith(ex.input + task.output_prefix)
            assert text.count(task.input_prefix) == k + 1
            assert prompts.prompt(task, i, k, seed=0, multiple_choice=False) == text
    assert any(prompts.shot_indices(task, i, 3, 0) != prompts.shot_indices(task, i, 3, 1) for i in range(20))
    with pytest.raises(ValueError, match="20 shots need 20 other examples"):
        prompts.shot_indices(task, 0, 20, seed=0)


def test_a_bigbench_task_with_subtasks_parses_and_scores(scorer, cfg, params, tokenizer):
    tasks = load_tasks(str(FIXTURES / "arithmetic"))
    assert [t.name for t in tasks] == ["arithmetic/1_digit_subtraction", "arithmetic/2_digit_addition"]
    task = tasks[1]
    assert task.metrics == ("exact_str_match", "multiple_choice_grade") and task.output_regex == r"[-+]?\d+"
    assert "canary" in task.canary and task.examples[0].input == "What is 80 plus 29?"
    assert task.examples[0].targets == ("109",) and task.examples[0].answer == "109"
    zero_shot = prompts.prompt(task, 0, 0, seed=0, multiple_choice=True)
    assert zero_shot.startswith("\nQ: What is 80 plus 29?\n  choice: ") and zero_shot.endswith("\nA: ")
    assert sorted(zero_shot.split("\n  choice: ")[1:-1] + [zero_shot.split("\n  choice: ")[-1][:-4]]) == sorted(
        task.examples[0].choices)

    metrics = harness.evaluate_task(scorer, task, 1, limit=3)
    assert metrics["examples"] == 3
    for key in ("multiple_choice_grade", "multiple_choice_grade_norm", "exact_str_match"):
        assert 0.0 <= metrics[key] <= 1.0
    # The continuous metrics, recomputed by hand from the full forward pass.
    logprobs, per_token = [], []
    for i in range(3):
        context_ids, target_ids = split_tokens(tokenizer, prompts.prompt(task, i, 1, 0, multiple_choice=False),
                                               task.examples[i].targets[0])
        total, _ = by_hand(cfg, params, context_ids, target_ids)
        logprobs.append(total)
        per_token.append(total / len(target_ids))
    assert metrics["target_logprob"] == pytest.approx(np.mean(logprobs), rel=1e-5)
    assert metrics["target_logprob_per_token"] == pytest.approx(np.mean(per_token), rel=1e-5)
    # The grades: the credit of the choice with the highest log-likelihood, raw and per UTF-8 byte.
    grades, grades_norm = [], []
    for i in range(3):
        ex, context = task.examples[i], prompts.prompt(task, i, 1, 0, multiple_choice=True)
        lls = np.array([s.logprob for s in scorer.loglikelihoods([[(context, c) for c in ex.choices]])[0]])
        grades.append(ex.choice_scores[int(np.argmax(lls))])
        grades_norm.append(ex.choice_scores[int(np.argmax(lls / [len(c.encode()) for c in ex.choices]))])
    assert metrics["multiple_choice_grade"] == pytest.approx(np.mean(grades))
    assert metrics["multiple_choice_grade_norm"] == pytest.approx(np.mean(grades_norm))
    # Cut from the left: every 1-shot choice prompt (> 64 characters), and every generation prompt
    # (58 tokens, EOS included), which must leave room for the 3-token answer + GENERATION_MARGIN.
    assert metrics["truncated_prompts"] == 3 * 7 + 3


def write_jsonl(path, header, rows):
    path.write_text("\n".join(json.dumps(r) for r in ([{"task": header}] if header else []) + rows) + "\n")
    return str(path)


def test_exact_match_and_edit_distance_of_the_greedy_output(tmp_path, cfg, params, tokenizer, scorer):
    contexts = ["Hello, world", "1 + 1 ="]
    greedy = [tokenizer.decode(greedy_by_hand(cfg, params, [tokenizer.eos_id] + tokenizer.encode(c), 5))
              for c in contexts]
    assert all(len(g) == 5 for g in greedy)
    wrong = greedy[1][:-1] + ("a" if greedy[1][-1] != "a" else "b")  # one substitution
    rows = [{"context": contexts[0], "target": greedy[0]}, {"context": contexts[1], "target": wrong}]
    header = {"stop": [], "max_new_tokens": 5}
    task = load_tasks(write_jsonl(tmp_path / "gen.jsonl", {**header, "kind": "generation"}, rows))[0]
    metrics = harness.evaluate_task(scorer, task, 0)
    assert metrics["exact_str_match"] == 0.5
    assert metrics["edit_distance"] == 0.5  # 0 and 1
    cloze = load_tasks(write_jsonl(tmp_path / "cloze.jsonl", {**header, "kind": "cloze"}, rows))[0]
    assert harness.evaluate_task(scorer, cloze, 0)["greedy_match"] == 0.5
    # A stop string cuts the output; output_regex then picks the answer out of it.
    assert harness.cut_at_stop("109\nQ: next", ["\nQ: ", "\n"]) == "109"
    assert harness.extract(" The answer is -42.", r"[-+]?\d+") == "-42"
    assert harness.extract("none", r"\d+") == ""
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [5, 6]) == 2


def test_bad_task_files_fail_with_one_clear_error(tmp_path):
    bigbench = {"name": "t", "metrics": ["exact_str_match"], "examples": [{"input": "a", "target": "b"}]}

    def write(name, content):
        path = tmp_path / name
        path.write_text(json.dumps(content))
        return str(path)

    missing = {**bigbench, "examples": [{"input": "a", "target": "b"}, {"target": "c"}]}
    with pytest.raises(ValueError, match=r"example 1 has no 'input'"):
        load_tasks(write("missing.json", missing))
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        load_tasks(write("bleu.json", {**bigbench, "metrics": ["bleu"]}))
    with pytest.raises(ValueError, match="example 0 has no choices"):
        load_tasks(write("mc.json", {**bigbench, "metrics": ["multiple_choice_grade"]}))
    with pytest.raises(ValueError, match=r"line 2: 'answer' must be the index of the right choice \(0..1\)"):
        load_tasks(write_jsonl(tmp_path / "a.jsonl", None, [{"context": "c", "choices": ["x", "y"], "answer": 0},
                                                           {"context": "c", "choices": ["x", "y"], "answer": 2}]))
    with pytest.raises(ValueError, match="line 1: no 'context'"):
        load_tasks(write_jsonl(tmp_path / "b.jsonl", None, [{"target": "x"}]))
    with pytest.raises(ValueError, match="unknown kind 'essay'"):
        load_tasks(write_jsonl(tmp_path / "c.jsonl", {"kind": "essay"}, [{"context": "c", "target": "x"}]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tasks(str(tmp_path / "nope.json"))


def test_evaluate_every_checkpoint_of_a_run_writes_one_json_per_step(tmp_path, cfg, params):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(CHARS) * 4)
    c = config_lib.default_config()
    c.data.update(source=f"text:{corpus}", tokenizer="char", seq_len=16, cache_dir=str(tmp_path / "cache"))
    c.model.update({key: cfg[key] for key in ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "max_len", "init_std")})
    workdir = str(tmp_path / "run")
    setup = workdir_lib.Setup(c, workdir)
    tx, _ = step_lib.make_tx(setup.config, step_lib.abstract_params(setup.config, setup.model))
    manager = checkpointing.make_manager(workdir, setup.config.checkpoint)
    for step, scale in ((10, 1.0), (20, 1.5)):
        step_params = jax.tree.map(lambda p, scale=scale: p * scale, params)
        state = TrainState(jnp.int32(step), step_params, tx.init(step_params), jax.random.PRNGKey(0))
        checkpointing.save(manager, step, state, data_state={}, config=config_lib.to_json(setup.config))
    manager.wait_until_finished()
    manager.close()
    task = write_jsonl(tmp_path / "mc.jsonl", {"name": "mc", "max_new_tokens": 5},
                       [{"context": f"{i} is", "choices": [" odd", " even"], "answer": int(i % 2 == 0)}
                        for i in range(4)])
    results = harness.evaluate_workdir(None, workdir, [task], [0, 1], all_checkpoints=True)  # the run's own config
    assert sorted(results) == [10, 20]
    for step in (10, 20):
        saved = json.loads((tmp_path / "run" / "evals" / f"{step}.json").read_text())
        assert saved["step"] == step and set(saved["results"]["mc"]) == {"0", "1"}
        assert saved["results"] == results[step]
    assert results[10]["mc"]["0"]["target_logprob"] != results[20]["mc"]["0"]["target_logprob"]
    # Step 10 holds exactly the fixture's parameters: evaluated directly, they give the same metrics.
    direct = harness.evaluate_task(Scorer(cfg, params, setup.tokenizer, batch_size=8), load_tasks(task)[0], 0)
    assert direct == pytest.approx(results[10]["mc"]["0"], rel=1e-6)
    table = harness.format_table(results)
    assert table.count("\n") == 1 + 4 and "mc_norm" in table

    # --quantize=int8: the newest checkpoint's weights quantized once (kept beside the checkpoints),
    # scored as the float model scores the dequantized weights, results in evals/int8/.
    quantized = harness.evaluate_workdir(None, workdir, [task], [0], quantize="int8")
    assert (tmp_path / "run" / "evals" / "int8" / "20.json").is_file()
    assert (tmp_path / "run" / "quantized" / "int8" / "20").is_dir()
    qscorer = harness.open_scorer(workdir, quantize="int8")
    dequantized = quant_lib.dequantize_params(qscorer.params)
    float_of_int8 = harness.evaluate_task(Scorer(cfg, dequantized, setup.tokenizer, batch_size=8), load_tasks(task)[0], 0)
    assert quantized[20]["mc"]["0"] == pytest.approx(float_of_int8, rel=1e-5)
    assert quantized[20]["mc"]["0"]["target_logprob"] != results[20]["mc"]["0"]["target_logprob"]


def test_induction_score_is_late_minus_early_loss_on_repeated_halves(cfg, params, tokenizer):
    T = 7
    tokens = induction.repeated_sequences(tokenizer, 3, T, seed=1)
    assert tokens.shape == (3, 1 + 2 * T) and (tokens[:, 0] == tokenizer.eos_id).all()
    assert (tokens[:, 1 : 1 + T] == tokens[:, 1 + T :]).all() and (tokens[:, 1:] != tokenizer.eos_id).all()
    lp = exact_log_probs(cfg, params, tokens[:, :-1])
    loss_of = lambda b, p: -lp[b, p - 1, tokens[b, p]]  # the loss of the token at position p
    early = np.mean([loss_of(b, p) for b in range(3) for p in range(2, 1 + T)])
    late = np.mean([loss_of(b, p) for b in range(3) for p in range(2 + T, 1 + 2 * T)])
    score = induction.induction_score(cfg, params, tokens, T)
    assert score["early_loss"] == pytest.approx(early, rel=1e-5)
    assert score["late_loss"] == pytest.approx(late, rel=1e-5)
    assert score["icl_score"] == pytest.approx(late - early, rel=1e-4, abs=1e-5)


def test_key_value_task_answers_are_given_only_in_the_prompt_and_it_scores(scorer):
    task = induction.key_value_task(6, 4, num_values=4, seed=3)
    assert task == induction.key_value_task(6, 4, num_values=4, seed=3)  # seeded
    for ex in task.examples:
        *pairs, query = ex.input.split(" ")
        mapping = dict(p.split(":") for p in pairs)
        assert len(mapping) == 4 and query.endswith(":") and query[:-1] in mapping
        assert ex.targets == (mapping[query[:-1]],) and ex.answer == mapping[query[:-1]]
        assert ex.choice_scores[ex.choices.index(ex.answer)] == 1.0 and sum(ex.choice_scores) == 1.0
    metrics = harness.evaluate_task(scorer, task, 0)
    assert metrics["examples"] == 6 and 0.0 <= metrics["multiple_choice_grade"] <= 1.0


def test_lm_eval_requests_score_like_the_full_forward_by_hand(cfg, params, tokenizer, scorer):
    """lm-evaluation-harness's three request types (lm_eval itself is not installed here: requests
    are plain objects with `.args`, as the harness's Instances are)."""
    from types import SimpleNamespace

    from lmjax.evals.eleuther import LmjaxRequests

    requests = LmjaxRequests(scorer)
    got = requests.loglikelihood([SimpleNamespace(args=r) for r in REQUESTS[:2]])
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, got):
        expected, expected_greedy = by_hand(cfg, params, [tokenizer.eos_id] + tokenizer.encode(context),
                                            tokenizer.encode(continuation))
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-5) and greedy == expected_greedy

    # Rolling: disjoint windows of MAX_LEN predicted tokens, each seeing only its own window.
    long_text = "".join(CHARS[(7 * i) % 60] for i in range(2 * MAX_LEN + 9))
    ids = [tokenizer.eos_id] + tokenizer.encode(long_text)
    expected = sum(by_hand(cfg, params, ids[s - 1 : s], ids[s : s + MAX_LEN])[0] for s in range(1, len(ids), MAX_LEN))
    short_text = "to be or not"
    short = by_hand(cfg, params, [tokenizer.eos_id], tokenizer.encode(short_text))[0]
    rolled = requests.loglikelihood_rolling([SimpleNamespace(args=(long_text,)), SimpleNamespace(args=(short_text,))])
    assert rolled == pytest.approx([expected, short], rel=1e-5)

    # Greedy generation, cut at the first stop string; sampling is refused.
    prompt = "Q: 2+2=? A:"
    greedy_text = tokenizer.decode(greedy_by_hand(cfg, params, [tokenizer.eos_id] + tokenizer.encode(prompt), 6))
    stop = greedy_text[2:4]
    out = requests.generate_until([SimpleNamespace(args=(prompt, {"until": [stop], "max_gen_toks": 6})),
                                   SimpleNamespace(args=(prompt, {"until": "\x0b\x0c", "max_gen_toks": 6}))])
    assert out == [greedy_text[: greedy_text.find(stop)], greedy_text.split("\x0b\x0c")[0]]
    with pytest.raises(ValueError, match="sampling"):
        requests.generate_until([SimpleNamespace(args=(prompt, {"do_sample": True, "temperature": 1.0}))])
