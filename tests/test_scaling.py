"""Scaling-law fits recover known laws from synthetic data; the shape rule and sweeps hit their targets."""

import json
import math

import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax.scaling import chinchilla, envelope, kaplan, predict, shapes, sweeps

# Hoffmann et al. (2022)'s fitted law, used as ground truth for synthetic sweeps.
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def true_loss(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


@pytest.fixture(scope="module")
def base():
    return config_lib.load("configs/gpt_small.py")


@pytest.mark.parametrize("target", [5e5, 2e6, 1e7, 1.2e8, 1e9])
def test_shape_rule_hits_target_counts_at_the_aspect_ratio(base, target):
    shape = shapes.shape_for_params(target, base.model, aspect_ratio=64, head_dim=64)
    # head_dim-wide steps in width are coarse for small models: the tolerance tightens with size.
    assert abs(shape.non_embedding_params / target - 1) < (0.25 if target < 1e6 else 0.15 if target < 1e8 else 0.05)
    assert shape.num_heads * 64 == shape.embed_dim
    if target >= 1e7:
        assert 32 <= shape.embed_dim / shape.num_layers <= 128
        closed = shapes.closed_form_non_embedding(shape.num_layers, shape.embed_dim)
        assert abs(closed / shape.non_embedding_params - 1) < 0.02  # 12 L d^2 is param_count less biases/norms


def test_shape_rule_at_fixed_depth_scales_only_the_width(base):
    """Widths 16..128 at 2 layers: the count is the exact one of the nearest width, depth never moves."""
    found = [shapes.shape_for_params(n, base.model, head_dim=8, num_layers=2) for n in (6e3, 14e3, 25e3, 56e3, 1e5, 2.2e5)]
    assert [s.num_layers for s in found] == [2] * 6
    assert [s.embed_dim for s in found] == [16, 24, 32, 48, 64, 96]
    assert all(s.non_embedding_params == shapes.count_non_embedding(base.model, 2, s.embed_dim, 8) for s in found)
    with pytest.raises(ValueError, match="2 layers"):
        shapes.shape_for_params(1e3, base.model, head_dim=8, num_layers=2)


def test_shape_rule_refuses_a_size_below_one_layer(base):
    with pytest.raises(ValueError, match="smallest shape has"):
        shapes.shape_for_params(500, base.model, head_dim=32)


def test_isoflop_runs_have_readable_names_and_spend_their_budget(base):
    runs = sweeps.isoflop(base, budgets=[1e14, 1e15], sizes=[2.1e6, 8e6])
    assert [r.name for r in runs] == ["isoflop_C1e14_N2.1M", "isoflop_C1e14_N8M",
                                      "isoflop_C1e15_N2.1M", "isoflop_C1e15_N8M"]
    per_step = base.train.batch_size * base.data.seq_len
    for r in runs:
        assert r.tokens == r.overrides["train.steps"] * per_step
        assert abs(r.flops / r.budget - 1) < 6 * r.n_params * per_step / r.budget  # within one step
        assert 1 <= r.overrides["optim.warmup_steps"] < r.overrides["train.steps"]


def test_grid_and_kaplan_generators(base):
    assert [r.name for r in sweeps.grid(base, [1e6, 4e6], [2e8, 5e8])] == [
        "grid_N1M_D200M", "grid_N1M_D500M", "grid_N4M_D200M", "grid_N4M_D500M"]
    runs = sweeps.kaplan(base, [1e6, 4e6], tokens=2e8)
    assert [r.name for r in runs] == ["kaplan_N1M", "kaplan_N4M"] and runs[0].tokens == runs[1].tokens


def test_wsd_runs_report_the_smaller_budgets_at_decay_points(base):
    per_step = base.train.batch_size * base.data.seq_len
    runs = sweeps.wsd(base, [1e6], tokens=[100 * per_step, 200 * per_step, 400 * per_step])
    assert [r.name for r in runs] == [f"wsd_N1M_D{sweeps.format_count(400 * per_step)}"]
    assert runs[0].overrides["optim.schedule"] == "wsd"
    assert runs[0].overrides["optim.wsd_decay_points"] == (100, 200)
    assert runs[0].overrides["train.steps"] == 400


def test_kaplan_power_laws_recover_known_exponents():
    rng = np.random.default_rng(0)
    n = np.geomspace(1e5, 1e9, 12)
    loss_n = (8.8e13 / n) ** 0.076 * np.exp(rng.normal(0, 0.002, n.size))
    # Undertrained runs of the same sizes lie above the frontier and must not bias the fit.
    law = kaplan.fit_loss_vs_params(np.concatenate([n, n]), np.concatenate([loss_n, loss_n * 1.3]))
    assert abs(law.exponent - 0.076) < 0.004 and abs(math.log10(law.scale) - math.log10(8.8e13)) < 0.5
    d = np.geomspace(1e7, 1e11, 12)
    law_d = kaplan.fit_loss_vs_tokens(d, (5.4e13 / d) ** 0.095 * np.exp(rng.normal(0, 0.002, d.size)))
    assert abs(law_d.exponent - 0.095) < 0.004
    c = np.geomspace(1e15, 1e21, 12)
    law_c = kaplan.fit_loss_vs_compute(c, (3.1e8 * 8.64e19 / c) ** 0.050 * np.exp(rng.normal(0, 0.002, c.size)))
    assert abs(law_c.exponent - 0.050) < 0.004
    print(f"\nKaplan recovered: alpha_N {law.exponent:.4f} (0.076), alpha_D {law_d.exponent:.4f} (0.095), "
          f"alpha_C {law_c.exponent:.4f} (0.050)")


def test_approach2_recovers_known_exponents_from_isoflop_curves():
    """The true optimum of E + A/N^a + B/D^b at 6ND = C grows as N ~ C^(b/(a+b)), D ~ C^(a/(a+b))."""
    rng = np.random.default_rng(1)
    budgets, n_all, losses = [], [], []
    for c in np.geomspace(1e18, 1e22, 5):
        n_star = 0.6 * (c / 6) ** (TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]))
        n = n_star * np.geomspace(1 / 4, 4, 9)
        budgets += [c] * n.size
        n_all += list(n)
        losses += list(true_loss(n, c / (6 * n)) * np.exp(rng.normal(0, 0.001, n.size)))
    fit = chinchilla.fit_isoflop(budgets, n_all, losses)
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    print(f"\napproach 2: a={fit.n_law.exponent:.4f} (true {a_true:.4f}), b={fit.d_law.exponent:.4f} (true {1 - a_true:.4f})")
    assert abs(fit.n_law.exponent - a_true) < 0.02
    assert abs(fit.d_law.exponent - (1 - a_true)) < 0.02
    assert abs(fit.n_law.exponent + fit.d_law.exponent - 1) < 1e-9  # D = C / 6N exactly


def test_approach2_rejects_a_budget_whose_loss_is_not_convex_in_n():
    n = np.array([1e6, 2e6, 4e6])
    with pytest.raises(ValueError, match="C=1e.16: loss is not convex"):
        chinchilla.fit_isoflop([1e15] * 3 + [1e16] * 3, np.concatenate([n, n]), [3.0, 2.9, 2.95, 2.6, 2.55, 2.3])


def test_approach2_leaves_out_budgets_whose_minimum_is_not_sampled_when_not_strict():
    """A profile still falling at its largest size (minimum outside the sizes) is named, not fitted."""
    n = np.array([1e6, 2e6, 4e6])
    budgets = [1e15] * 3 + [1e16] * 3 + [1e17] * 3
    losses = [3.0, 2.9, 2.95, 2.6, 2.5, 2.55, 2.6, 2.5, 2.45]
    with pytest.raises(ValueError, match="C=1e.17: the parabola's minimum"):
        chinchilla.fit_isoflop(budgets, np.concatenate([n, n, n]), losses)
    fit = chinchilla.fit_isoflop(budgets, np.concatenate([n, n, n]), losses, strict=False)
    assert list(fit.budgets) == [1e15, 1e16] and list(fit.skipped) == [1e17]
    assert all(1e6 <= n_opt <= 4e6 for n_opt in fit.n_opt)


def test_approach2_window_fits_the_sizes_around_the_minimum_and_ignores_flat_tails():
    """Tiny sweeps flatten far from the optimum (the largest models barely train); a window of sizes
    centred on the lowest loss recovers the vertex that a whole-profile parabola misses."""
    n = np.geomspace(1e4, 1e6, 7)
    budgets, n_all, losses, n_true = [], [], [], []
    for c, n_star in ((1e12, 4e4), (1e13, 1.2e5)):
        profile = 3.0 + 0.3 * np.log(n / n_star) ** 2  # an exact parabola in log N, minimum at n_star
        profile[n > 3 * n_star] = profile[n <= 3 * n_star].max()  # a plateau: the untrained large models
        budgets += [c] * n.size
        n_all += list(n)
        losses += list(profile)
        n_true.append(n_star)
    whole = chinchilla.fit_isoflop(budgets, n_all, losses)
    windowed = chinchilla.fit_isoflop(budgets, n_all, losses, window=3)
    assert np.allclose(windowed.n_opt, n_true, rtol=1e-6)
    assert np.all(np.abs(np.log(whole.n_opt / n_true)) > 0.1)  # the plateau drags the whole-profile vertex
    assert np.allclose(windowed.fit_ranges[0], [n[1], n[3]])  # the lowest loss (n[2]) and its neighbours
    with pytest.raises(ValueError, match="window=2"):
        chinchilla.fit_isoflop(budgets, n_all, losses, window=2)


def test_batched_lbfgs_minimizes_rosenbrock_from_every_start():
    import jax
    import jax.numpy as jnp

    from lmjax.scaling import lbfgs

    def rosenbrock(x_P, scale):
        return scale * ((1 - x_P[0]) ** 2 + 100 * (x_P[1] - x_P[0] ** 2) ** 2)

    with jax.enable_x64(True):
        starts = jnp.array([[-1.2, 1.0], [2.0, -1.0], [0.0, 0.0], [1.0, 1.0]])
        scales = jnp.array([1.0, 2.0, 0.5, 1.0])  # a per-start argument, like bootstrap weights
        x, f = jax.jit(lambda x0, s: lbfgs.minimize(rosenbrock, x0, s, iters=150))(starts, scales)
    np.testing.assert_allclose(np.asarray(x), np.ones((4, 2)), atol=1e-5)
    assert np.all(np.asarray(f) < 1e-10)


def test_approach3_recovers_known_law_from_4500_starts():
    rng = np.random.default_rng(0)
    n = np.repeat(np.geomspace(1e7, 1e10, 8), 8)
    d = np.tile(np.geomspace(1e9, 1e12, 8), 8)
    loss = true_loss(n, d) * np.exp(rng.normal(0, 0.003, n.size))
    fit = chinchilla.fit_parametric(n, d, loss, bootstrap=30)
    assert fit.num_starts == 4500
    assert abs(fit.E - TRUE["E"]) < 0.05
    assert abs(fit.alpha - TRUE["alpha"]) < 0.02 and abs(fit.beta - TRUE["beta"]) < 0.02
    assert abs(math.log(fit.A / TRUE["A"])) < 0.25 and abs(math.log(fit.B / TRUE["B"])) < 0.25
    for name in TRUE:
        lo, hi = fit.intervals[name]
        assert lo <= getattr(fit, name) <= hi
    # compute_optimal spends exactly C and sits at the minimum along the IsoFLOP line.
    c = 1e21
    n_opt, d_opt = fit.compute_optimal(c)
    assert math.isclose(6 * n_opt * d_opt, c, rel_tol=1e-9)
    ns = n_opt * np.geomspace(0.5, 2, 41)
    assert np.argmin(fit.predict(ns, c / (6 * ns))) == 20
    assert math.isclose(fit.tokens_per_param(c), d_opt / n_opt)


def synthetic_curves(sizes, max_flops, points_per_curve=60, min_tokens=1e8):
    """Training curves of every size up to `max_flops`, each point's loss given by the true law."""
    n, d = [], []
    for size in sizes:
        tokens = np.geomspace(min_tokens, max_flops / (6 * size), points_per_curve)
        n += [size] * len(tokens)
        d += list(tokens)
    n, d = np.array(n), np.array(d)
    return n, d, true_loss(n, d)


def test_approach1_recovers_known_exponents_from_training_curves():
    n, d, loss = synthetic_curves(np.geomspace(1e7, 1e10, 31), 1e22)
    fit = envelope.fit_envelope(n, d, loss)
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # 0.4516: the law's N_opt ~ C^a
    assert abs(fit.n_law.exponent - a_true) < 0.01 and abs(fit.d_law.exponent - (1 - a_true)) < 0.01
    assert len(fit.flops) >= 20 and np.allclose(fit.flops, 6 * fit.n_opt * fit.d_opt)
    law = chinchilla.ParametricFit(**TRUE, objective=0.0, num_starts=0, fit_time_s=0.0)
    for c in fit.flops[::5]:  # each winner is within one size step of the law's optimum, and as good
        n_true, d_true = law.compute_optimal(c)
        assert abs(np.log(predict.optimum(fit, c)[0] / n_true)) < 0.3
        assert np.min(loss[np.isclose(6 * n * d, c)]) >= law.predict(n_true, d_true) - 1e-9


def test_approach1_leaves_out_bins_won_by_the_smallest_or_largest_size():
    """Sizes that all lie below the optimum (~5e6 at the smallest compute, 6e15): every bin is won by
    the largest size, so there is no envelope."""
    n, d, loss = synthetic_curves(np.geomspace(1e5, 1e6, 5), 1e20, min_tokens=1e10)
    with pytest.raises(ValueError, match=r"approach 1: only 0 compute bins have a winner inside the sizes"):
        envelope.fit_envelope(n, d, loss)
    assert len(envelope.fit_envelope(n, d, loss, drop_edge_sizes=False).flops) > 3


def test_bootstrap_intervals_of_every_approach_cover_the_truth_on_noisy_curves():
    rng = np.random.default_rng(0)
    sizes = np.geomspace(1e7, 1e10, 16)
    n, d, loss = synthetic_curves(sizes, 1e22, 40)
    loss = loss * np.exp(rng.normal(0, 0.003, loss.shape))
    runs = np.repeat(np.arange(sizes.size), 40)

    def fit(picked):
        i = np.concatenate([np.flatnonzero(runs == k) for k in picked])
        return envelope.fit_envelope(n[i], d[i], loss[i])
    refits = predict.bootstrap_fits(fit, sizes.size, 40)
    prediction = predict.predict("approach 1", envelope.fit_envelope(n, d, loss), 1e21, refits)
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    lo, hi = prediction.intervals["a"]
    assert prediction.replicates >= 30 and lo <= a_true <= hi and hi - lo < 0.2
    law = chinchilla.ParametricFit(**TRUE, objective=0.0, num_starts=0, fit_time_s=0.0)
    lo, hi = prediction.intervals["n_opt"]
    assert lo <= law.compute_optimal(1e21)[0] <= hi


def test_approach3_needs_more_runs_than_parameters():
    with pytest.raises(ValueError, match="needs more than 5 runs"):
        chinchilla.fit_parametric([1e6, 2e6], [1e8, 1e8], [3.0, 2.9])


@pytest.mark.slow
def test_scaling_laws_notebook_fits_and_plots_a_synthetic_sweep(tmp_path, monkeypatch):
    import os

    import nbformat
    from nbclient import NotebookClient

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", repo)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("LMJAX_SWEEP_DIR", str(tmp_path / "sweep"))
    notebook = nbformat.read(os.path.join(repo, "notebooks", "scaling_laws.ipynb"), as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": repo}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "Chinchilla approach 3" in text and "tokens per parameter" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4
    assert sorted(os.listdir(tmp_path / "sweep" / "plots")) == [
        "isoflop.png", "loss_contours.png", "loss_vs_compute.png", "optimal_allocation.png"]


def write_synthetic_sweep(root, budgets, tokens_per_step=1e6, log_every=20):
    """A sweep dir as the launcher and trainer leave it: sweep.json, and per run summary.json and
    metrics.jsonl, every loss given by the true law. Per budget, five sizes around the law's optimum."""
    law = chinchilla.ParametricFit(**TRUE, objective=0.0, num_starts=0, fit_time_s=0.0)
    planned = []
    for c in budgets:
        for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
            n = float(np.round(law.compute_optimal(c)[0] * factor))
            steps = int(round(c / (6 * n) / tokens_per_step))
            d = steps * tokens_per_step
            name = f"isoflop_C{c:.0e}_x{factor}"
            planned.append({"name": name, "overrides": {}, "n_params": n, "tokens": d, "budget": c, "count": "total"})
            (root / name).mkdir(parents=True)
            curve = [{"step": s, "loss": float(true_loss(n, s * tokens_per_step))}
                     for s in range(log_every, steps + 1, log_every)]
            (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
            (root / name / "summary.json").write_text(json.dumps(
                {"completed": True, "param_count": n, "non_embedding_params": n, "tokens_seen": d, "steps": steps,
                 "final_val_loss": float(true_loss(n, d))}))
    (root / "sweep.json").write_text(json.dumps({"name": "synthetic", "base_config": "x", "overrides": {},
                                                 "runs": planned}))
    return planned


def test_predict_flops_fits_below_the_budget_and_matches_a_hand_computation(tmp_path, capsys, monkeypatch):
    from launch import analyze

    # 32 of the 4,500 starts (the full grid is tested above; here it would only cost time).
    some_starts = chinchilla.initial_grid()[::140]
    monkeypatch.setattr(chinchilla, "initial_grid", lambda: some_starts)
    planned = write_synthetic_sweep(tmp_path / "sweep", (1e17, 3e17, 1e18, 1e19))
    target = 1e19  # the runs of the 1e19 budget are held out: the prediction must not see them
    assert analyze.main([f"--sweep_dir={tmp_path / 'sweep'}", f"--predict_flops={target}", "--envelope_smooth=1",
                         "--isoflop_window=0", f"--out_dir={tmp_path / 'out'}", "--bootstrap=8", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "from the 15 rows below it; held out: isoflop_C1e+19_x0.25" in out and "| approach 3 |" in out
    got = {p["approach"]: p for p in json.load(open(tmp_path / "out" / "fits.json"))["predictions"]}
    assert set(got) == {"approach 1", "approach 2", "approach 3"}
    # Approach 2 by hand: a parabola in log N per budget, lines in log-log space through the minima.
    minima = []
    for c in (1e17, 3e17, 1e18):
        runs = [r for r in planned if r["budget"] == c]
        log_n = np.log([r["n_params"] for r in runs])
        p2, p1, p0 = np.polyfit(log_n, [true_loss(r["n_params"], r["tokens"]) for r in runs], 2)
        minima.append((c, np.exp(-p1 / (2 * p2)), p0 - p1 * p1 / (4 * p2)))
    c, n_min, loss_min = (np.array(v) for v in zip(*minima))
    n_slope, n_icpt = np.polyfit(np.log(c), np.log(n_min), 1)
    l_slope, l_icpt = np.polyfit(np.log(c), np.log(loss_min), 1)
    n_hand = np.exp(n_icpt + n_slope * np.log(target))
    assert got["approach 2"]["a"] == pytest.approx(n_slope, rel=1e-6)
    assert got["approach 2"]["n_opt"] == pytest.approx(n_hand, rel=1e-6)
    assert got["approach 2"]["d_opt"] == pytest.approx(target / (6 * n_hand), rel=1e-6)
    assert got["approach 2"]["loss"] == pytest.approx(np.exp(l_icpt + l_slope * np.log(target)), rel=1e-6)
    # Approach 3 by hand: the data follow the law exactly, so the fit is the law and its optimum is eq. 4's.
    alpha, beta, A, B = TRUE["alpha"], TRUE["beta"], TRUE["A"], TRUE["B"]
    g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    n_opt = g * (target / 6) ** (beta / (alpha + beta))
    d_opt = target / (6 * n_opt)
    assert got["approach 3"]["n_opt"] == pytest.approx(n_opt, rel=0.02)
    assert got["approach 3"]["d_opt"] == pytest.approx(d_opt, rel=0.02)
    assert got["approach 3"]["loss"] == pytest.approx(true_loss(n_opt, d_opt), rel=1e-3)
    # Approach 1 from the curves: near the law's optimum (its sizes are a factor 2 apart).
    assert abs(np.log(got["approach 1"]["n_opt"] / n_opt)) < np.log(2)
    a_true = beta / (alpha + beta)
    for p in got.values():  # 90% intervals over the 8 bootstrap refits
        assert p["replicates"] >= 2 and set(p["intervals"]) == {"a", "b", "n_opt", "d_opt", "loss"}
        assert all(lo <= hi for lo, hi in p["intervals"].values())
    for approach in ("approach 2", "approach 3"):
        lo, hi = got[approach]["intervals"]["a"]
        assert lo - 1e-9 <= a_true <= hi + 1e-9
    # The held-out runs at C score the predictions: the minimum of a parabola in log N through them.
    held_out = [r for r in planned if r["budget"] == target]
    p2, p1, p0 = np.polyfit(np.log([r["n_params"] for r in held_out]),
                            [true_loss(r["n_params"], r["tokens"]) for r in held_out], 2)
    measured = json.load(open(tmp_path / "out" / "fits.json"))["measured"]
    assert measured["n_opt"] == pytest.approx(np.exp(-p1 / (2 * p2)), rel=1e-9)
    assert measured["loss"] == pytest.approx(p0 - p1 * p1 / (4 * p2), rel=1e-9)
    assert f"| approach 3 | {got['approach 3']['n_opt']:.3g} | {measured['n_opt']:.3g} |" in out
