"""Few-shot key->value lookup (lmjax.evals.induction): training episodes state one mapping each, the
few-shot task asks one fresh mapping of every instance of its keys, and the harness's k-shot prompts
show that mapping, never the evaluated example, and show its key exactly when `key_shown` says so."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lmjax.evals import induction, prompts

ITEM = re.compile(r"([A-Z])([a-z])([0-9])")  # instance, key, value


def items(text: str) -> list[tuple[str, str, str]]:
    """(instance, key, value) of every item of `text`, which must be items joined by single spaces."""
    parts = text.split(" ")
    matches = [ITEM.fullmatch(p) for p in parts]
    assert all(matches), f"not a sequence of items: {text!r}"
    return [m.groups() for m in matches]


def test_episodes_state_one_mapping_and_repeat_its_keys():
    def episodes(seed):
        rng = np.random.default_rng(seed)
        return [induction.key_value_episode(rng, 12, max_keys=5, num_values=7) for _ in range(300)]

    texts = episodes(0)
    assert texts == episodes(0) and texts != episodes(1)  # seeded
    mappings = []
    for text in texts:
        parsed = items(text)
        assert len(parsed) == 12
        mapping: dict[str, str] = {}
        for _, key, value in parsed:
            assert mapping.setdefault(key, value) == value, f"key {key} has two values in {text!r}"
            assert int(value) < 7
        # at most 5 keys among 12 items: at least 7 items repeat a key, predictable from the context alone
        assert 1 <= len(mapping) <= 5
        mappings.append(tuple(sorted(mapping.items())))
    assert len(set(mappings)) > 0.9 * len(mappings)  # a mapping of its own per episode
    assert {len(m) for m in mappings} == {1, 2, 3, 4, 5}  # every mapping size occurs


def test_the_fewshot_task_asks_one_fresh_mapping_of_every_instance_of_its_keys():
    task = induction.key_value_fewshot_task(3, 5, num_values=6, seed=7)
    assert task == induction.key_value_fewshot_task(3, 5, num_values=6, seed=7)  # seeded
    assert task.separator == induction.LOOKUP_SEPARATOR and not task.input_prefix and not task.output_prefix
    assert len({ex.input for ex in task.examples}) == len(task.examples) == 15  # no two examples share a text
    mapping: dict[str, str] = {}
    instances: dict[str, set[str]] = {}
    for ex in task.examples:
        instance, key = ex.input
        assert instance.isupper() and key.islower()
        assert mapping.setdefault(key, ex.answer) == ex.answer and ex.targets == (ex.answer,)
        instances.setdefault(key, set()).add(instance)
        assert ex.choices == tuple("012345") and ex.choice_scores[ex.choices.index(ex.answer)] == 1.0
        assert sum(ex.choice_scores) == 1.0
    assert len(mapping) == 3 and all(len(s) == 5 for s in instances.values())
    others = [induction.key_value_fewshot_task(3, 5, num_values=6, seed=s) for s in range(8)]
    assert len({tuple(sorted({ex.input[1]: ex.answer for ex in t.examples}.items())) for t in others}) == 8  # fresh


@pytest.mark.parametrize("k", [0, 1, 2, 4, 8, 15])
def test_k_shot_prompts_show_the_mapping_never_the_query_and_its_key_as_key_shown_says(k):
    task = induction.key_value_fewshot_task(4, 4, num_values=10, seed=2)
    mapping = {ex.input[1]: ex.answer for ex in task.examples}
    shown = []
    for i, ex in enumerate(task.examples):
        text = prompts.prompt(task, i, k, seed=5, multiple_choice=True)
        assert text == prompts.prompt(task, i, k, seed=5, multiple_choice=False)  # scored and generated alike
        *demonstrations, query = text.split(induction.LOOKUP_SEPARATOR)
        assert query == ex.input and len(demonstrations) == k
        parsed = items(" ".join(demonstrations)) if k else []
        assert all(mapping[key] == value for _, key, value in parsed)  # the prompt states the task's mapping
        assert all(instance + key != ex.input for instance, key, _ in parsed)  # never the query itself
        shown.append(any(key == ex.input[1] for _, key, _ in parsed))
        assert induction.key_shown(task, i, k, seed=5) == shown[-1]
        # a prompt and its answer read as a training episode does: items joined by the separator
        assert len(items(text + ex.answer)) == k + 1
    fraction = np.mean(shown)
    if k == 0:
        assert fraction == 0.0
    if k == len(task.examples) - 1:  # every other example: the 3 other instances of its key among them
        assert fraction == 1.0
    if k in (1, 2):  # the exact chance that 1 or 2 of the 15 others include one of the 3 same-key ones
        expected = 3 / 15 if k == 1 else 1 - (12 * 11) / (15 * 14)
        assert abs(fraction - expected) < 0.25


def test_bad_sizes_fail_with_one_clear_error():
    with pytest.raises(ValueError, match="num_keys"):
        induction.key_value_fewshot_task(27, 2)
    with pytest.raises(ValueError, match="instances_per_key"):
        induction.key_value_fewshot_task(2, 0)
    with pytest.raises(ValueError, match="num_values"):
        induction.key_value_fewshot_task(2, 2, num_values=11)
    with pytest.raises(ValueError, match="max_keys"):
        induction.key_value_episode(np.random.default_rng(0), 5, max_keys=0)
    with pytest.raises(ValueError, match="num_items"):
        induction.key_value_episode(np.random.default_rng(0), 0)
