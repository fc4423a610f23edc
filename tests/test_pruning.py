"""Pruning: each method's mask removes what it says (the smallest weights, two of every four, whole heads,
the lowest |W| * ||x||), 0% changes nothing, and pruned weights stay zero through fine-tuning."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_model import FAST_COMPILE, init
from test_train import random_batch, tiny_config

from lmjax import config as config_lib
from lmjax import train
from lmjax.model import Transformer
from lmjax.model.norms import make_norm
from lmjax.train import pruning
from lmjax.train import step as step_lib


@pytest.fixture(scope="module")
def trained():
    c = tiny_config(num_layers=2, embed_dim=32, vocab_size=64)
    c.model.init_std = 0.1
    return c, init(c.model)


def kernels(tree):
    flat = flax.traverse_util.flatten_dict(tree)
    return {"/".join(k): np.asarray(v) for k, v in flat.items() if k[0].startswith("block_") and k[-1] == "kernel"}


def test_magnitude_removes_the_smallest_share_of_each_matrix(trained):
    c, params = trained
    masks = pruning.masks_for(params, "magnitude", 0.3)
    for name, w in kernels(params).items():
        keep = kernels(masks)[name].astype(bool)
        assert (~keep).sum() == round(0.3 * w.size), name
        assert np.abs(w[~keep]).max() <= np.abs(w[keep]).min(), name
    untouched = flax.traverse_util.flatten_dict(masks)
    assert all(np.all(untouched[k] == 1) for k in untouched if k[-1] != "kernel" or not k[0].startswith("block_"))


def test_zero_sparsity_changes_nothing(trained):
    c, params = trained
    for method in ("magnitude", "heads"):
        pruned = pruning.apply_masks(params, pruning.masks_for(params, method, 0.0))
        for a, b in zip(jax.tree.leaves(pruned), jax.tree.leaves(params)):
            assert np.array_equal(a, b)


def test_two_of_four_leaves_exactly_two_of_every_four_inputs(trained):
    c, params = trained
    pruned = pruning.apply_masks(params, pruning.masks_for(params, "2:4", 0.5))
    for name, w in kernels(pruned).items():
        inputs = 2 if name.endswith("attn/out/kernel") else 1
        w_IxO = w.reshape(int(np.prod(w.shape[:inputs])), -1)
        zeros = (w_IxO.reshape(-1, 4, w_IxO.shape[1]) == 0).sum(axis=1)
        assert np.all(zeros == 2), name
    assert pruning.sparsity_of(pruned) == 0.5


def test_pruned_heads_add_nothing(trained):
    c, params = trained
    masks = pruning.masks_for(params, "heads", 0.5)  # 2 of 4 heads per layer
    pruned = pruning.apply_masks(params, masks)
    for layer in ("block_0", "block_1"):
        query, out = pruned[layer]["attn"]["query"], pruned[layer]["attn"]["out"]["kernel"]
        dropped = np.where(np.all(np.asarray(query["kernel"]) == 0, axis=(0, 2)))[0]
        assert len(dropped) == 2 and np.all(np.asarray(out)[dropped] == 0)
        assert np.all(np.asarray(query["bias"])[dropped] == 0)
        kept = np.setdiff1d(np.arange(4), dropped)
        assert np.array_equal(query["kernel"][:, kept], params[layer]["attn"]["query"]["kernel"][:, kept])
        # The dropped heads had the smallest query + output weight norms.
        norm = lambda h: float(jnp.sum(params[layer]["attn"]["query"]["kernel"][:, h] ** 2)
                                + jnp.sum(params[layer]["attn"]["out"]["kernel"][h] ** 2))
        assert max(norm(h) for h in dropped) <= min(norm(h) for h in kept)


def test_wanda_weighs_each_weight_by_its_inputs_norm(trained):
    c, params = trained
    tokens = np.asarray(random_batch(c)["inputs"])
    norms = pruning.input_norms(Transformer(c.model), params, [tokens[:4], tokens[4:]])
    # Block 0's query reads the first attention norm of the embeddings: its input norm by hand.
    x = params["embedding"][tokens] + params["pos_embedding"][np.arange(tokens.shape[1])]
    x = make_norm(c.model).apply({"params": params["block_0"]["attn_norm"]}, x)
    np.testing.assert_allclose(norms[("block_0", "attn", "query", "kernel")],
                               np.sqrt((np.asarray(x) ** 2).sum(axis=(0, 1))), rtol=1e-4)
    assert norms[("block_1", "attn", "out", "kernel")].shape == (c.model.embed_dim,)  # heads x head_dim
    masks = pruning.masks_for(params, "wanda", 0.25, norms)
    w = np.asarray(params["block_1"]["mlp"]["down"]["kernel"])
    keep = np.asarray(masks["block_1"]["mlp"]["down"]["kernel"]).astype(bool)
    score = np.abs(w) * np.asarray(norms[("block_1", "mlp", "down", "kernel")])[:, None]
    for o in range(w.shape[1]):  # per output unit: the lowest quarter of |W| * ||x|| goes
        assert (~keep[:, o]).sum() == round(0.25 * w.shape[0])
        assert score[~keep[:, o], o].max() <= score[keep[:, o], o].min()


def test_pruned_weights_stay_zero_through_fine_tuning():
    """AdamW steps with weight decay and clipping, the run's optimizer, on the masked loss."""
    c = tiny_config(num_layers=1, embed_dim=32, vocab_size=64)
    c.optim.update(name="adamw", lr=1e-2, weight_decay=0.1, clip=1.0)
    params = init(c.model)
    masks = pruning.masks_for(params, "magnitude", 0.5)
    pruned = pruning.apply_masks(params, masks)
    model = Transformer(c.model)
    tx, _ = train.make_tx(c, train.abstract_params(c, model))
    loss = pruning.masked_loss_sums_fn(step_lib.lm_loss_sums_fn(c, model), masks)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(params, opt_state, batch):
        grads = jax.grad(lambda p: loss(p, batch, jax.random.key(0), jnp.int32(0))[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    state = (pruned, tx.init(pruned))
    for seed in range(3):
        state = step(*state, jax.tree.map(jnp.asarray, random_batch(c, seed=seed)))
    for name, w in kernels(state[0]).items():
        keep = kernels(masks)[name].astype(bool)
        assert np.all(w[~keep] == 0), name
        assert np.all(w[keep] != kernels(pruned)[name][keep]), name  # the kept weights did train


def test_bad_pruning_settings_are_refused():
    c = config_lib.default_config()
    c.prune.method = "random"
    with pytest.raises(ValueError, match="config.prune.method='random' is not valid"):
        pruning.check(c)
    c.prune.update(method="2:4", sparsity=0.7)
    with pytest.raises(ValueError, match="removes exactly half"):
        pruning.check(c)
