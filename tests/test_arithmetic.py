"""The synthetic arithmetic corpus (`arithmetic:` source) and the emergence benchmark's analysis."""

import json
import re

import pytest

from benchmarks import emergence
from lmjax.config import default_config
from lmjax.data import arithmetic, sources
from lmjax.evals import prompts
from lmjax.evals.tasks import load_tasks

PROBLEM = re.compile(r"\nQ: What is (\d+) (plus|minus|times|divided by) (\d+)\?\nA: (-?\d+)")
SYMBOLS = {"plus": "+", "minus": "-", "times": "*", "divided by": "/"}


def data_cfg(tmp_path, source, val_fraction=0.1):
    c = default_config().data
    c.source, c.cache_dir, c.val_fraction = source, str(tmp_path / "cache"), val_fraction
    return c


def test_the_same_seed_gives_the_same_corpus_and_another_seed_another():
    spec = arithmetic.parse("seed=3,documents=40,problems=4")
    train = arithmetic.documents(spec, "train", 0.1)
    assert train == arithmetic.documents(arithmetic.parse("seed=3,documents=40,problems=4"), "train", 0.1)
    assert len(train) == 40 and len(arithmetic.documents(spec, "validation", 0.1)) == 4
    assert train != arithmetic.documents(arithmetic.parse("seed=4,documents=40,problems=4"), "train", 0.1)
    assert train[:4] != arithmetic.documents(spec, "validation", 0.1)  # the splits are separate streams
    assert arithmetic.parse("3") == arithmetic.parse("seed=3")


def test_held_out_questions_are_never_generated():
    spec = arithmetic.parse("seed=0,digits=1,documents=100,problems=8,ops=add,holdout=0.5")
    generated = set(arithmetic.questions(spec, "train", 0.0))
    space = {arithmetic.question(a, "add", b) for a in range(10) for b in range(10)}
    held = {q for q in space if arithmetic.held_out(q, 0.5)}
    assert 20 < len(held) < 80  # about half of the 100 one-digit sums
    assert generated == space - held  # 800 draws cover every other one
    with pytest.raises(ValueError, match="holdout=0.999 leaves"):
        arithmetic.documents(arithmetic.parse("digits=1,documents=1,problems=1,ops=div,holdout=0.999"), "train", 0.0)


def test_every_answer_is_what_python_computes_and_operands_have_the_digits_asked():
    spec = arithmetic.parse("seed=0,digits=3,documents=200,problems=5")
    docs = arithmetic.documents(spec, "train", 0.0)
    found = [m for doc in docs for m in PROBLEM.findall(doc)]
    assert len(found) == 200 * 5  # nothing but problems
    words = set()
    for a, word, b, ans in found:
        words.add(word)
        assert len(a) <= 3 and len(b) <= 3
        assert eval(f"{a} {SYMBOLS[word]} {b}") == int(ans)  # divisions are exact: a / b is a whole number
    assert words == set(SYMBOLS)  # all four operations occur
    only = arithmetic.documents(arithmetic.parse("seed=0,documents=30,ops=add+mul"), "train", 0.0)
    assert {w for doc in only for _, w, _, _ in PROBLEM.findall(doc)} == {"plus", "times"}


def test_a_document_is_a_bigbench_k_shot_prompt_with_its_answer(tmp_path):
    # A hand-written task in BIG-bench's format (default prefixes), read by the harness's own loader.
    (tmp_path / "task.json").write_text(json.dumps({"name": "hand", "metrics": ["exact_str_match"], "examples": [
        {"input": "What is 12 plus 7?", "target": "19"}, {"input": "What is 3 minus 5?", "target": "-2"}]}))
    task = load_tasks(str(tmp_path / "task.json"))[0]
    one_shot = prompts.prompt(task, 1, 1, seed=0, multiple_choice=False)
    assert one_shot + "-2" == arithmetic.render([(12, "add", 7), (3, "sub", 5)])
    assert prompts.prompt(task, 0, 0, seed=0, multiple_choice=False) + "19" == arithmetic.render([(12, "add", 7)])


def test_the_arithmetic_source_serves_the_generator_and_bad_specs_fail_clearly(tmp_path):
    c = data_cfg(tmp_path, "arithmetic:seed=1,documents=20,problems=3,ops=add")
    split = sources.get_split(c, "train")
    assert split.documents() == arithmetic.documents(arithmetic.parse("seed=1,documents=20,problems=3,ops=add"), "train", 0.1)
    assert len(sources.get_split(c, "validation").documents()) == 2
    assert split.fingerprint != sources.get_split(data_cfg(tmp_path, "arithmetic:seed=2,documents=20,problems=3,ops=add"),
                                                  "train").fingerprint
    for bad, named in (("arithmetic:ops=pow", "unknown op 'pow'"), ("arithmetic:digits=0", "digits must be >= 1"),
                       ("arithmetic:size=3", "unknown key 'size'")):
        with pytest.raises(ValueError, match=named):
            sources.get_split(data_cfg(tmp_path, bad), "train")


def _fake_run(sweep_dir, name, params, tokens, source, results):
    run = sweep_dir / name
    (run / "evals").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "completed": True, "param_count": params, "non_embedding_params": params // 2, "tokens_seen": tokens,
        "steps": 10, "config": {"data": {"source": source, "val_fraction": 0.0}}}))
    (run / "evals" / "10.json").write_text(json.dumps({"step": 10, "seed": 0, "results": results}))
    return {"name": name, "n_params": params, "tokens": tokens, "count": "total", "budget": None}


def _metrics(examples, exact, logprob):
    return {"0": {"examples": examples, "exact_str_match": exact, "multiple_choice_grade": exact,
                  "target_logprob_per_token": logprob, "edit_distance": 1.0 - exact, "target_logprob": 2 * logprob}}


def test_emergence_analysis_of_a_two_run_sweep_keeps_unseen_questions_and_plots(tmp_path):
    source = "arithmetic:seed=0,documents=5,problems=2,ops=add"
    seen_question = next(arithmetic.questions(arithmetic.parse(source.partition(":")[2]), "train", 0.0))
    sweep_dir = tmp_path / "sweep"
    runs = [_fake_run(sweep_dir, "big", 4000, 1000, source, {"add2": _metrics(3, 0.5, -0.3),
                                                              "add2.unseen": _metrics(2, 0.25, -0.5)}),
            _fake_run(sweep_dir, "small", 1000, 1000, source, {"add2": _metrics(3, 0.0, -1.5),
                                                                "add2.unseen": _metrics(2, 0.0, -1.75)})]
    (sweep_dir / "sweep.json").write_text(json.dumps({"name": "fake", "runs": runs}))
    task_dir = tmp_path / "arith" / "add2"
    task_dir.mkdir(parents=True)
    (task_dir / "task.json").write_text(json.dumps({"name": "add2", "metrics": ["exact_str_match"], "examples": [
        {"input": "What is 1234 plus 1?", "target": "1235"}, {"input": seen_question, "target": "0"},
        {"input": "What is 5555 plus 5?", "target": "5560"}]}))
    tasks = load_tasks(str(task_dir))

    every = emergence.gather(str(sweep_dir), tasks, shots=0, unseen_only=False)
    assert [(p.run, p.task, p.flops, p.seen_in_training) for p in every] == [("small", "add2", 6e6, 1),
                                                                            ("big", "add2", 2.4e7, 1)]
    unseen = emergence.gather(str(sweep_dir), tasks, shots=0)
    assert [(p.run, p.task, p.seen_in_training, p.metrics["target_logprob_per_token"]) for p in unseen] == [
        ("small", "add2.unseen", 0, -1.75), ("big", "add2.unseen", 0, -0.5)]
    assert [ex.input for ex in emergence.tasks_for_run(tasks, {seen_question}, True)[0].examples] == [
        "What is 1234 plus 1?", "What is 5555 plus 5?"]
    with pytest.raises(ValueError, match="1-shot results"):
        emergence.gather(str(sweep_dir), tasks, shots=1)

    out = tmp_path / "out"
    assert emergence.main([f"--sweep_dir={sweep_dir}", f"--tasks={tmp_path / 'arith'}", "--subtasks=add2",
                           "--no-evaluate", f"--out={out}"]) == 0
    readme = (out / "README.md").read_text()
    assert "| small | 1,000 | 1,000 | 6.00e+06 | add2.unseen | 2 | 0 | 0.000 | 0.000 | -1.750 | 1.000 |" in readme
    assert "| big | 4,000 | 1,000 | 2.40e+07 | add2.unseen | 2 | 0 | 0.250 | 0.250 | -0.500 | 0.750 |" in readme
    assert (out / "emergence.png").read_bytes()[:4] == b"\x89PNG"
    assert emergence.main([f"--sweep_dir={sweep_dir}", f"--tasks={tmp_path}", "--subtasks=nope", "--no-evaluate"]) == 2
