"""In-context learning: the induction score of a model over training, and key->value tasks whose answers
are given only in the prompt.

The induction score (Olsson et al. 2022, "In-context Learning and Induction Heads") is measured on
sequences whose second half repeats a random first half: a token of the first half cannot be
predicted, one of the second half can be, by copying what followed its earlier occurrence. So

  icl_score = late_loss - early_loss

where early_loss is the mean loss on first-half tokens and late_loss on second-half tokens (each
half's first token excluded: it follows nothing to copy). About 0 before induction heads form;
strongly negative (down to -early_loss) once the model copies. Olsson et al. report the loss at the
500th token minus the 50th on natural text; on repeated random tokens the same quantity isolates
copying. Sequences start with EOS, as training documents do, and draw only ordinary tokens (ids
whose text is at least one byte).

Few-shot lookup (Chan et al. 2022's few-shot classification with labels assigned at random per
episode, written as text): the item `Fq3` says that key `q`, in its instance `F`, has value `3`.
Keys are lowercase letters, instances uppercase ones, so two examples of one key differ in text
while the value still follows its key directly, as an induction head copies. A k-shot prompt
(`prompts.prompt`) shows k other examples of one random mapping, never the evaluated example nor
one with its text, and helps only when one of them is another instance of the queried key: the
mapping is given nowhere but in the prompt. `key_value_episode` writes training documents in the
same format, each with a mapping of its own.
"""

from __future__ import annotations

import functools
import string
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import FrozenConfigDict, config_dict

from lmjax import data
from lmjax.evals import prompts
from lmjax.evals.tasks import EXACT_MATCH, MULTIPLE_CHOICE, Example, Task
from lmjax.model import Transformer
from lmjax.train import checkpointing
from lmjax.train import workdir as workdir_lib

LETTERS = np.array(list(string.ascii_lowercase))


def repeated_sequences(tokenizer: data.Tokenizer, num_sequences: int, half_length: int, seed: int = 0) -> np.ndarray:
    """[num_sequences, 1 + 2 * half_length] int32: EOS (when the tokenizer has one), then a random first
    half of ordinary tokens, then the same half again."""
    ordinary = np.flatnonzero(tokenizer.token_bytes() > 0)
    half_NxT = np.random.default_rng(seed).choice(ordinary, size=(num_sequences, half_length))
    start = [[tokenizer.eos_id]] * num_sequences if tokenizer.eos_id >= 0 else np.zeros((num_sequences, 0))
    return np.concatenate([start, half_NxT, half_NxT], axis=1).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _token_losses(cfg, params, tokens_BxL):
    """-log p(tokens[:, t + 1] | tokens[:, :t + 1]) for every t: [B, L - 1]."""
    logits_BxLxV = Transformer(cfg).apply({"params": params}, tokens_BxL[:, :-1])
    logprobs_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logprobs_BxLxV, tokens_BxL[:, 1:, None], axis=-1)[..., 0]


def induction_score(model_cfg: Any, params: Any, tokens_BxL: np.ndarray, half_length: int) -> dict[str, float]:
    """{early_loss, late_loss, icl_score} on `repeated_sequences` rows of halves of `half_length`."""
    losses_BxL = np.asarray(_token_losses(FrozenConfigDict(model_cfg), nn.unbox(params), jnp.asarray(tokens_BxL)))
    first = tokens_BxL.shape[1] - 2 * half_length  # index of the first token of the first half
    # losses_BxL[:, t] is the loss of token t + 1: first-half tokens first+1 .. first+T-1, second-half
    # tokens first+T+1 .. first+2T-1.
    early = losses_BxL[:, first : first + half_length - 1]
    late = losses_BxL[:, first + half_length : first + 2 * half_length - 1]
    early_loss, late_loss = float(early.mean()), float(late.mean())
    return {"early_loss": early_loss, "late_loss": late_loss, "icl_score": late_loss - early_loss}


def run_induction_scores(config: config_dict.ConfigDict, workdir: str, *, num_sequences: int = 32,
                         half_length: int | None = None, seed: int = 0) -> list[dict[str, float]]:
    """The induction score of every checkpoint of a run, oldest first: [{step, early_loss, late_loss,
    icl_score}]. Halves default to fill the training sequence length (`data.seq_len`), the longest
    context every position of which was trained."""
    workdir_lib.require_checkpoint(workdir)
    setup = workdir_lib.Setup(config, workdir)
    setup.restore(read_only=True)  # checks that the checkpoints hold this config's model
    start = 1 if setup.tokenizer.eos_id >= 0 else 0
    half_length = half_length or (min(int(config.data.seq_len), int(setup.config.model.max_len)) - start) // 2
    if half_length < 2:
        raise ValueError(f"half_length={half_length}: the induction score needs halves of at least 2 tokens")
    tokens = repeated_sequences(setup.tokenizer, num_sequences, half_length, seed)
    manager = checkpointing.make_manager(workdir, setup.config.checkpoint, read_only=True)
    scores = []
    try:
        for step in sorted(manager.all_steps()):
            restored = checkpointing.restore_step(manager, step, setup.abstract_state)
            scores.append({"step": step, **induction_score(setup.config.model, restored.state.params, tokens, half_length)})
    finally:
        manager.close()
    return scores


def key_value_task(num_examples: int, num_pairs: int, *, num_keys: int = 26, num_values: int = 10,
                   seed: int = 0) -> Task:
    """A task answerable only in context: each example draws its own random mapping of letter keys to
    digit values, shows `num_pairs` distinct keys with their values ("q:3 f:7 ..."), then asks for
    one of the shown keys ("f:"). The answer is its value; the choices are every value. Accuracy as
    a function of num_pairs is few-shot accuracy on in-context associations (evaluate it at 0 shots:
    the demonstrations are inside each input)."""
    if not 1 <= num_pairs <= num_keys <= 26 or not 2 <= num_values <= 10:
        raise ValueError(f"key_value_task: need 1 <= num_pairs ({num_pairs}) <= num_keys ({num_keys}) <= 26 "
                         f"and 2 <= num_values ({num_values}) <= 10")
    rng = np.random.default_rng([seed, num_pairs])
    keys, values = string.ascii_lowercase[:num_keys], [str(v) for v in range(num_values)]
    examples = []
    for _ in range(num_examples):
        shown = rng.choice(num_keys, size=num_pairs, replace=False)
        mapping = {keys[k]: values[rng.integers(num_values)] for k in shown}
        query = keys[shown[rng.integers(num_pairs)]]
        text = " ".join(f"{k}:{v}" for k, v in mapping.items()) + f" {query}:"
        answer = mapping[query]
        examples.append(Example(text, (answer,), tuple(values), tuple(float(v == answer) for v in values)))
    return Task(
        name=f"key_value/{num_pairs}_pairs", examples=tuple(examples), metrics=(MULTIPLE_CHOICE, EXACT_MATCH),
        input_prefix="", output_prefix="", separator="\n", append_choices=False, stop_strings=(" ", "\n"),
        max_new_tokens=2,
    )


LOOKUP_SEPARATOR = " "  # between items, in training documents and k-shot prompts alike


def lookup_query(key: str, instance: str) -> str:
    """An item up to its value: instance letter (uppercase), then key letter (lowercase)."""
    return f"{instance.upper()}{key}"


def key_value_episode(rng: np.random.Generator, num_items: int, *, max_keys: int = 8, num_values: int = 10) -> str:
    """A training document: a mapping of 1..max_keys random letter keys to random digits (drawn
    independently, so one key's value says nothing of another's), then `num_items` items, each a key
    drawn uniformly from the mapping in a random instance, and the key's value. Keys recur, so
    every item after a key's first is predictable from the context, and only from it."""
    if not 1 <= max_keys <= 26 or not 2 <= num_values <= 10 or num_items < 1:
        raise ValueError(f"key_value_episode: need 1 <= max_keys ({max_keys}) <= 26, 2 <= num_values "
                         f"({num_values}) <= 10 and num_items ({num_items}) >= 1")
    keys = rng.choice(LETTERS, size=rng.integers(1, max_keys + 1), replace=False)
    values = {k: str(v) for k, v in zip(keys, rng.integers(num_values, size=len(keys)))}
    items = zip(rng.choice(keys, size=num_items), rng.choice(LETTERS, size=num_items))
    return LOOKUP_SEPARATOR.join(lookup_query(k, i) + values[k] for k, i in items)


def key_value_fewshot_task(num_keys: int, instances_per_key: int, *, num_values: int = 10, seed: int = 0) -> Task:
    """One fresh random mapping of `num_keys` letter keys to digits, asked of `instances_per_key`
    instances of each key: example `Fq` has the value of `q` as its answer and every digit as a
    choice. Evaluate it at k shots: the demonstrations are the mapping (see `key_shown`)."""
    if not 1 <= num_keys <= 26 or not 1 <= instances_per_key <= 26 or not 2 <= num_values <= 10:
        raise ValueError(f"key_value_fewshot_task: need 1 <= num_keys ({num_keys}) <= 26, 1 <= instances_per_key "
                         f"({instances_per_key}) <= 26 and 2 <= num_values ({num_values}) <= 10")
    rng = np.random.default_rng([seed, num_keys, instances_per_key])
    values = [str(v) for v in range(num_values)]
    examples = []
    for key in rng.choice(LETTERS, size=num_keys, replace=False):
        answer = values[rng.integers(num_values)]
        for instance in rng.choice(LETTERS, size=instances_per_key, replace=False):
            credit = tuple(float(v == answer) for v in values)
            examples.append(Example(lookup_query(key, instance), (answer,), tuple(values), credit))
    order = rng.permutation(len(examples))  # keys interleaved: an example's place says nothing of its key
    return Task(
        name=f"key_value_fewshot/{num_keys}_keys", examples=tuple(examples[i] for i in order),
        metrics=(MULTIPLE_CHOICE, EXACT_MATCH), input_prefix="", output_prefix="", separator=LOOKUP_SEPARATOR,
        append_choices=False, stop_strings=(LOOKUP_SEPARATOR, "\n"), max_new_tokens=2,
    )


def key_shown(task: Task, index: int, k: int, seed: int) -> bool:
    """Whether the k-shot prompt of example `index` (`prompts.prompt` with this seed) shows its key.
    A perfect in-context learner answers those and guesses the rest, so the mean over examples of
    shown + (1 - shown) / len(choices) is the accuracy ceiling at k shots."""
    key = task.examples[index].input[1]
    return any(task.examples[i].input[1] == key for i in prompts.shot_indices(task, index, k, seed))
