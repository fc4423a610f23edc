"""Early exits: the training loss is the weighted sum of the truncated models' losses; decoding that never
exits is the full model, decoding that always exits is the model cut after the first exit, and a row's
tokens do not depend on the rows decoded beside it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import FrozenConfigDict
from test_model import FAST_COMPILE, V, init, tiny_cfg
from test_train import random_batch, tiny_config

from lmjax.infer import early_exit as exit_decoding
from lmjax.model import Transformer, decoding, generate
from lmjax.model import early_exit
from lmjax.train import step as step_lib
from lmjax.train.loss import cross_entropy_sums

PROMPTS = [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3]]  # a ragged batch
NEW = 8


@pytest.fixture(scope="module")
def model():
    cfg = tiny_cfg(num_layers=2, position="rope")
    return cfg, init(cfg)


def truncated(cfg, params, layers):
    """The model cut after `layers` blocks: its config and parameters."""
    cut = tiny_cfg(**{**cfg.to_dict(), "num_layers": layers})
    keep = {k: v for k, v in params.items() if not k.startswith("block_") or int(k[6:]) < layers}
    return cut, keep


def test_threshold_above_one_never_exits_and_gives_the_full_models_tokens(model):
    cfg, params = model
    want = generate(cfg, params, PROMPTS, NEW, temperature=0)
    got, stats = exit_decoding.generate(cfg, params, PROMPTS, NEW, exits=(1,), threshold=1.0)
    assert got == want
    assert stats.mean_layers == 2 and stats.exit_rate == 0


def test_threshold_zero_gives_the_greedy_tokens_of_the_model_cut_at_the_first_exit(model):
    cfg, params = model
    cut_cfg, cut_params = truncated(cfg, params, 1)
    want = generate(cut_cfg, cut_params, PROMPTS, NEW, temperature=0)
    got, stats = exit_decoding.generate(cfg, params, PROMPTS, NEW, exits=(1,), threshold=0.0)
    assert got == want
    assert stats.mean_layers == 1 and stats.exit_rate == 1
    assert got != generate(cfg, params, PROMPTS, NEW, temperature=0)  # the cut model does differ


def test_rows_exit_alone_as_in_a_batch(model):
    """With some tokens leaving and some not, each row's tokens and exits are those of a batch of copies
    of it (the same compiled program as the mixed batch): there the rows leave together, so skipped
    layers take the k/v-only branch, whose cache entries must equal those of the blocks run on the
    frozen state in the mixed batch."""
    cfg, params = model
    threshold = 0.05  # chosen so that some tokens leave early and some do not, and one row always leaves
    batched, stats = exit_decoding.generate(cfg, params, PROMPTS, NEW, exits=(1,), threshold=threshold)
    assert 0 < stats.exit_rate < 1 and (stats.layers_used == 1).all(axis=1).any()
    for row, prompt in enumerate(PROMPTS):
        alone, alone_stats = exit_decoding.generate(cfg, params, [prompt] * len(PROMPTS), NEW, exits=(1,),
                                                     threshold=threshold, min_prompt_len=5)
        assert alone == [batched[row]] * len(PROMPTS)
        assert np.array_equal(alone_stats.layers_used[0], stats.layers_used[row])


def test_bad_exits_are_refused(model):
    cfg, params = model
    for exits in ((0,), (2,), (1, 1)):
        with pytest.raises(ValueError, match="each must be a distinct layer count in"):
            exit_decoding.generate(cfg, params, PROMPTS, NEW, exits=exits, threshold=0.5)


def test_layerskip_weights_grow_with_depth_and_sum_to_one():
    # raw: exit 1 -> 1 * 1 = 1, exit 2 -> 3, last (4 layers) -> 4 + 6 = 10
    assert early_exit.exit_weights(4, (1, 2), 1.0) == pytest.approx({1: 1 / 14, 2: 3 / 14, 4: 10 / 14})
    assert early_exit.exit_weights(4, (1, 2), 0.0) == {1: 0.0, 2: 0.0, 4: 1.0}


def test_early_exit_loss_is_the_weighted_sum_of_the_truncated_models_losses():
    c = tiny_config(num_layers=2, embed_dim=32, vocab_size=V)
    c.train.batch_size = 4
    params, batch = init(c.model), random_batch(c)
    batch = jax.tree.map(jnp.asarray, batch)
    model = Transformer(c.model)
    key, step = jax.random.key(0), jnp.int32(0)

    @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
    def ce(frozen_cfg, p):  # jitted as the loss is: the same program, the same bits
        logits = Transformer(frozen_cfg).apply({"params": p}, batch["inputs"])
        return cross_entropy_sums(logits, batch["targets"], batch["weights"])

    def loss_sums(c):
        return jax.jit(step_lib.lm_loss_sums_fn(c, model), compiler_options=FAST_COMPILE)(params, batch, key, step)

    plain_objective, plain = loss_sums(c)
    full_sum, weight_sum, _ = ce(FrozenConfigDict(c.model), params)
    assert plain_objective == full_sum and plain["loss_sum"] == full_sum  # the default path, bit for bit

    c.train.early_exit_layers, c.train.early_exit_scale = (1,), 0.5
    objective, sums = loss_sums(c)
    weights = {1: 0.5 * 1, 2: 2 + 0.5 * 1}  # l(l+1)/2 scaled; the last: N + scale * N(N-1)/2
    total = sum(weights.values())
    cut_cfg, cut_params = truncated(c.model, params, 1)
    want = {1: ce(FrozenConfigDict(cut_cfg), cut_params)[0], 2: full_sum}
    assert float(objective) == pytest.approx(sum(weights[l] / total * float(want[l]) for l in want), rel=1e-5)
    assert float(sums["exit1_loss_sum"]) == pytest.approx(float(want[1]), rel=1e-5)
    assert float(sums["loss_sum"]) == pytest.approx(float(full_sum), rel=1e-6) and sums["weight_sum"] == weight_sum
