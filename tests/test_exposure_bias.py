"""The exposure-bias experiment's pieces: the seeded addition generator, and accuracy vs output
length computed from teacher-forced hits and greedy outputs (checked on hand-made cases)."""

import pytest
from ml_collections import config_dict

from lmjax.data.tokenizers import CharTokenizer
from lmjax.evals import exposure
from lmjax.evals.scoring import Score, Scorer


def test_addition_problems_are_seeded_and_correct():
    assert exposure.addition_problem(57, 68, 4) == ("7500+8600=", "52100")
    assert exposure.addition_problem(9999, 1, 4) == ("9999+1000=", "00001")
    problems = exposure.addition_problems(300, 5, seed=3)
    assert problems == exposure.addition_problems(300, 5, seed=3)
    assert problems != exposure.addition_problems(300, 5, seed=4)
    for question, answer in problems:
        a, b = question.rstrip("=").split("+")
        assert len(a) == len(b) == 5 and len(answer) == 6
        assert int(a[::-1]) + int(b[::-1]) == int(answer[::-1])
    excluded = {q for q, _ in problems[:100]}
    assert not excluded & {q for q, _ in exposure.addition_problems(300, 5, seed=3, exclude=excluded)}
    with pytest.raises(ValueError, match="10\\*\\*2"):
        exposure.addition_problem(100, 1, 2)


def test_digit_sum_problems_are_seeded_and_follow_the_rule():
    assert exposure.digit_sum_problem("123", 8) == ("123:", "61078503")  # 1+2+3, 2+3+6=11, 3+6+1=10, ...
    assert exposure.digit_sum_problem("58", 5) == ("58:", "31459")  # 5+8=13, 8+3=11, 3+1, 1+4, 4+5
    problems = exposure.digit_sum_problems(200, 3, 12, seed=3)
    assert problems == exposure.digit_sum_problems(200, 3, 12, seed=3)
    assert problems != exposure.digit_sum_problems(200, 3, 12, seed=4)
    for question, answer in problems:
        digits = [int(c) for c in question.rstrip(":") + answer]
        assert len(question) == 4 and len(answer) == 12
        assert all(digits[i] == (digits[i - 3] + digits[i - 2] + digits[i - 1]) % 10 for i in range(3, len(digits)))
    with pytest.raises(ValueError, match="at least two digits"):
        exposure.digit_sum_problem("1", 4)


E = 12  # EOS of the character tokenizer of "0123456789+="


def test_accuracy_by_length_on_hand_made_outcomes():
    outcomes = [
        # derails at token 2 and stays wrong at 3, though teacher-forced it gets 3 right
        exposure.Outcome(gold=(1, 2, 3, E), free_running=(1, 5, 7, E), teacher_forced_hits=(True, False, True, True)),
        exposure.Outcome(gold=(1, 2, 3, E), free_running=(1, 2, 3, E), teacher_forced_hits=(True, True, True, True)),
        # a shorter answer whose greedy output never stopped: it counts only for t <= 2
        exposure.Outcome(gold=(4, E), free_running=(4,), teacher_forced_hits=(True, False)),
    ]
    table = exposure.accuracy_by_length(outcomes)
    expected = {  # t: (examples, teacher-forced token acc, free-running token acc, exact (both modes))
        1: (3, 1.0, 1.0, 1.0),
        2: (3, 1 / 3, 1 / 3, 1 / 3),
        3: (2, 1.0, 0.5, 0.5),
        4: (2, 1.0, 1.0, 0.5),
    }
    assert sorted(table) == sorted(expected)
    for t, (examples, teacher, free, exact) in expected.items():
        row = table[t]
        assert row["examples"] == examples
        assert row["teacher_forced_token_acc"] == pytest.approx(teacher)
        assert row["free_running_token_acc"] == pytest.approx(free)
        assert row["teacher_forced_exact"] == pytest.approx(exact)
        assert row["free_running_exact"] == pytest.approx(exact)


class CannedScorer(Scorer):
    """A Scorer whose model answers from a table: its tokenization and splitting are the real ones."""

    def __init__(self, hits: dict, outputs: dict):
        super().__init__(config_dict.ConfigDict({"max_len": 64}), {}, CharTokenizer("0123456789+="))
        self.hits, self.outputs, self.budgets = hits, outputs, []

    def score_ids(self, rows):
        return [Score(0.0, len(x), all(self.hits[tuple(c)]), self.hits[tuple(c)]) for c, x in rows]

    def greedy(self, prompts, max_new_tokens):
        self.budgets.append(max_new_tokens)
        return [list(self.outputs[p])[:max_new_tokens] for p in prompts]


def test_run_problems_ends_answers_with_eos_and_marks_outputs_that_stopped():
    tokenizer = CharTokenizer("0123456789+=")
    assert tokenizer.eos_id == E
    right, wrong = exposure.addition_problem(12, 34, 2), exposure.addition_problem(99, 99, 2)  # "64" + "0", "891"
    context = {q: tuple([E] + tokenizer.encode(q)) for q, _ in (right, wrong)}
    scorer = CannedScorer(
        hits={context[right[0]]: (True,) * 4, context[wrong[0]]: (True, False, False, True)},
        outputs={right[0]: tokenizer.encode("640"), wrong[0]: tokenizer.encode("8000")},  # the second never stops
    )
    outcomes = exposure.run_problems(scorer, [right, wrong])
    assert scorer.budgets == [4]

    def ids(text):
        return tuple(tokenizer.encode(text))

    assert outcomes[0] == exposure.Outcome(gold=ids("640") + (E,), free_running=ids("640") + (E,),
                                           teacher_forced_hits=(True,) * 4)
    assert outcomes[1] == exposure.Outcome(gold=ids("891") + (E,), free_running=ids("8000"),
                                           teacher_forced_hits=(True, False, False, True))
    table = exposure.accuracy_by_length(outcomes)
    assert [table[t]["free_running_token_acc"] for t in (1, 2, 3, 4)] == [1.0, 0.5, 0.5, 0.5]
    assert [table[t]["teacher_forced_token_acc"] for t in (1, 2, 3, 4)] == [1.0, 0.5, 0.5, 1.0]
