"""The layer-wise allocators beyond uniform/OWL/DLP (global, ER, ER-plus, LAMP, AlphaPruning) and allocation
expressions (DSA): hand computations on tiny tensors, every expression op, DLP and OWL written as expressions,
and a tiny end-to-end prune with each."""
import math

import numpy as np
import pytest
import torch

from dlp_deploy.errors import UserError
from dlp_deploy.prune.allocate import (ALLOCATORS, allocate, alphapruning_ratios, er_densities, er_ratios,
                                       get_allocator, global_threshold_ratios, hill_alpha, lamp_scores,
                                       lamp_statistic, split_allocations, summarize_scores)
from dlp_deploy.prune.expressions import POST_OPS, PRE_OPS, REDUCTIONS, parse
from dlp_deploy.prune.pipeline import (PruneSettings, capture_block_inputs, dense_layer_statistics,
                                       needs_calibration, prune_model)
from dlp_deploy.testing import tiny_llama

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(7))


def weighted(ratios, sizes):
    return float(np.dot(ratios, sizes) / np.sum(sizes))


# ---- global ------------------------------------------------------------------------------------------------

def test_global_threshold_hand_computation():
    a, b = summarize_scores(torch.tensor([1.0, 2, 3, 4, 9, 10])), summarize_scores(torch.tensor([[5.0, 6], [7, 8]]))
    # p = 0.5 of N = 10: k = 5, the 5th smallest score is 5; A keeps 9, 10 (4 of 6 pruned), B prunes only the 5
    alloc = global_threshold_ratios([a, b], 0.5)
    assert alloc.ratios == pytest.approx([4 / 6, 1 / 4])
    assert alloc.extras["threshold"][0] == 5.0
    assert global_threshold_ratios([a, b], 0.0).ratios == [0.0, 0.0]
    final = allocate("global", [a, b], [6, 4], 0.5)
    assert final.ratios == pytest.approx([4 / 6, 1 / 4]) and final.correction == 0.0


def test_global_summary_of_a_large_layer_is_within_its_resolution():
    g = torch.Generator().manual_seed(0)
    big, small = torch.rand(300_000, generator=g), torch.rand(5_000, generator=g) * 2
    approx = global_threshold_ratios([summarize_scores(big, 1024), summarize_scores(small, 1024)], 0.6).ratios
    exact = global_threshold_ratios([summarize_scores(big, 10**6), summarize_scores(small, 10**6)], 0.6).ratios
    assert approx == pytest.approx(exact, abs=2 / 1024)
    allscores = torch.cat([big, small])
    t = torch.sort(allscores).values[math.ceil(0.6 * allscores.numel()) - 1]
    assert exact == pytest.approx([float((big <= t).float().mean()), float((small <= t).float().mean())])


# ---- LAMP --------------------------------------------------------------------------------------------------

def test_lamp_scores_hand_computation():
    # sorted |w| = 1, 2, 3: squares 1, 4, 9; tails 14, 13, 9
    assert lamp_scores(torch.tensor([[3.0, -1.0], [2.0, 0.0]])).tolist() == pytest.approx([0, 1 / 14, 4 / 13, 1])
    assert lamp_scores(torch.tensor([2.0, 2.0])).tolist() == pytest.approx([0.5, 1.0])


def test_lamp_global_threshold_hand_computation():
    # block A: one matrix [1, 2, 3] -> LAMP 1/14, 4/13, 1; block B: [2, 2] -> 0.5, 1. p = 0.4 of 5: k = 2, the
    # threshold is 4/13: A loses 2 of 3, B nothing (magnitude would have pruned B's 2s before A's 3)
    stats = [lamp_statistic({"m": torch.tensor([1.0, 2.0, 3.0])}, {}),
             lamp_statistic({"m": torch.tensor([2.0, 2.0])}, {})]
    alloc = allocate("lamp", stats, [3, 2], 0.4)
    assert alloc.ratios == pytest.approx([2 / 3, 0.0]) and alloc.correction == pytest.approx(0.0)


def test_lamp_normalises_each_matrix_separately():
    # the same weights scaled by 10 in a second matrix of one block give the same LAMP scores
    s = lamp_statistic({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 20.0])}, {})
    assert s.values.tolist() == pytest.approx([0.2, 0.2, 1.0, 1.0])


# ---- ER, ER-plus ---------------------------------------------------------------------------------------------

def test_er_hand_computation():
    # raw (n_in+n_out)/(n_in n_out): 4x4 -> 8/16, 8x2 -> 10/16; eps*(16*.5 + 16*.625) = 16 -> eps = 8/9
    alloc = er_ratios([[(4, 4)], [(8, 2)]], 0.5)
    assert alloc.extras["density"] == pytest.approx([4 / 9, 5 / 9])
    assert alloc.ratios == pytest.approx([5 / 9, 4 / 9])


def test_er_makes_overfull_matrices_dense_and_resolves():
    # p = 0.05: eps = 30.4/18 puts the 8x2 at density 1.06 > 1; dense, then eps = (15.2 - 0.8)/8 = 1.8 -> 0.9
    assert er_densities([(4, 4), (8, 2)], 0.05).tolist() == pytest.approx([0.9, 1.0])
    assert allocate("er", [[(4, 4)], [(8, 2)]], [16, 16], 0.05).ratios == pytest.approx([0.1, 0.0])


def test_er_plus_keeps_the_last_matrix_dense_at_the_same_budget():
    # N = 48, 24 weights kept; the last (2x8) keeps its 16, the two 4x4s share 8 -> density 1/4 each
    alloc = er_ratios([[(4, 4)], [(4, 4), (2, 8)]], 0.5, plus=True)
    assert alloc.ratios == pytest.approx([0.75, 0.375])
    assert weighted(alloc.ratios, [16, 32]) == pytest.approx(0.5)
    assert er_ratios([[(4, 4)], [(4, 4), (2, 8)]], 0.5).ratios != pytest.approx(alloc.ratios)


# ---- AlphaPruning ----------------------------------------------------------------------------------------------

def test_hill_alpha_hand_computation():
    # eigenvalues of W^T W: 1, 2, 4, 8; i = 2, xmin = 4, k = 2: alpha = 1 + 2 / (ln 4 + ln 8 - 2 ln 4) = 1 + 2/ln 2
    w = torch.diag(torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64).sqrt())
    assert hill_alpha(w) == pytest.approx(1 + 2 / math.log(2), rel=1e-12)
    assert hill_alpha(w[[3, 1, 0, 2]]) == pytest.approx(hill_alpha(w), rel=1e-12)  # row order is irrelevant


def test_hill_alpha_is_lower_for_a_heavier_tail():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    light = u @ torch.diag(torch.linspace(1, 2, 64, dtype=torch.float64))
    heavy = u @ torch.diag(torch.logspace(0, 3, 64, dtype=torch.float64))
    assert hill_alpha(heavy) < hill_alpha(light)


def test_hill_alpha_of_a_flat_tail_is_infinite_and_maps_to_the_top_of_the_range():
    assert hill_alpha(torch.randn(4, 2)) == math.inf  # two eigenvalues: k = 1
    # p * (.8, 1.2, 1.2), mean .5333 rescaled to .5
    assert alphapruning_ratios([1, math.inf, 2], 0.5).ratios == pytest.approx([0.375, 0.5625, 0.5625])
    assert alphapruning_ratios([math.inf, math.inf], 0.5).ratios == [0.5, 0.5]


def test_alphapruning_mapping_hand_computation():
    # minmax(alpha) = 0, .5, 1 -> p*(0.8, 1.0, 1.2) = .4 .5 .6; sizes 1,1,2: sum n r = 2.1, target 2 -> x 2/2.1
    assert alphapruning_ratios([1, 2, 3], 0.5).ratios == pytest.approx([0.4, 0.5, 0.6])
    r = alphapruning_ratios([1, 2, 3], 0.5, [1, 1, 2]).ratios
    assert r == pytest.approx([0.4 / 1.05, 0.5 / 1.05, 0.6 / 1.05])
    final = allocate("alphapruning", [3, 1, 2], [1, 1, 2], 0.5)  # higher alpha -> pruned more
    assert final.ratios == pytest.approx([0.6, 0.4, 0.5])  # .6 + .4 + 2 * .5 = 2: no rescale needed
    assert final.correction == pytest.approx(0.0, abs=1e-12)
    assert allocate("alphapruning", [1, 2, 3], [1, 1, 1], 0.5, epsilon=0.1).ratios == pytest.approx([.45, .5, .55])


@pytest.mark.parametrize("name", ["global", "er", "er-plus", "lamp", "alphapruning"])
def test_every_new_allocator_passes_through_the_shared_correction(name):
    g = torch.Generator().manual_seed(1)
    shapes = [[(8, 4), (4, 8)], [(16, 4)], [(8, 8), (4, 2)]]
    weights = [{f"m{i}": torch.randn(*s, generator=g) for i, s in enumerate(b)} for b in shapes]
    stats = {"global": [get_allocator("global").layer_statistic({k: v.abs() for k, v in w.items()}, {})
                        for w in weights],
             "lamp": [lamp_statistic(w, {}) for w in weights],
             "er": shapes, "er-plus": shapes,
             "alphapruning": [get_allocator("alphapruning").layer_statistic(w, {}) for w in weights]}[name]
    sizes = [sum(o * i for o, i in b) for b in shapes]
    for p in (0.3, 0.7, 0.95):
        alloc = allocate(name, stats, sizes, p)
        assert weighted(alloc.ratios, sizes) == pytest.approx(p, abs=1e-9)
        assert all(0 <= r <= 0.99 for r in alloc.ratios)


# ---- expressions: grammar ---------------------------------------------------------------------------------

def test_parse_forms():
    e = parse("ABSLOG>VAR>ATAN,ASIN")
    assert (e.pre, e.reduce, e.post) == (("abslog",), "var", ("atan", "asin")) and str(e) == "abslog>var>atan,asin"
    assert str(parse("median")) == "median"
    assert parse("var>atan").post == ("atan",) and parse("var>atan").pre == ()
    assert parse("abs,log>mean").pre == ("abs", "log") and parse("abs>mean").post == ()
    assert parse("MMS>FROBENIUS_NORM>NO_OP").pre == ("minmax",) and parse("mms>frobenius_norm").reduce == "fro"
    assert parse("outlier(7)").reduce_arg == 7.0 and parse("outlier").reduce_arg is None


@pytest.mark.parametrize("text, part", [("abs>foo>atan", "reduction 'foo'"), ("bogus>mean", "pre-op 'bogus'"),
                                        ("mean>wobble", "post-op 'wobble'"), ("mean>var>atan", "pre-op 'mean'"),
                                        ("abs", "reduction 'abs'")])
def test_unknown_token_is_one_clear_error(text, part):
    with pytest.raises(UserError) as err:
        parse(text)
    msg = str(err.value)
    assert f"unknown {part}" in msg and "pre-ops: abs, log" in msg and "reductions:" in msg and "post-ops:" in msg


@pytest.mark.parametrize("text", ["", "a>b>c>d", "abs>>atan", "outlier(x)", "mean(3)", "outlier(0)"])
def test_malformed_expressions_are_refused(text):
    with pytest.raises(UserError):
        parse(text)


def test_unknown_allocation_names_the_registry_and_the_expression_form():
    with pytest.raises(UserError, match="global, er, er-plus, lamp, alphapruning.*expr:"):
        get_allocator("nope")
    assert get_allocator("expr:median>neg").uses_alpha and get_allocator("expr:median>neg").inputs == "wanda"


def test_split_allocations_keeps_commas_inside_expressions():
    assert split_allocations("dlp,expr:abslog>var>atan,asin,uniform") == ["dlp", "expr:abslog>var>atan,asin",
                                                                          "uniform"]
    assert split_allocations("expr:abs,log>mean,expr:median>neg,none") == ["expr:abs,log>mean", "expr:median>neg"]


# ---- expressions: every op -----------------------------------------------------------------------------------

X = torch.tensor([-2.0, 0.0, 0.5, 1.0, 3.0])
PRE_EXPECTED = {
    "abs": [2, 0, 0.5, 1, 3],
    "log": [math.log(1 + 1e-6), math.log(1 + 1e-6), math.log(0.5 + 1e-6), math.log(1 + 1e-6), math.log(3 + 1e-6)],
    "abslog": [math.log(2), 0, math.log(0.5), 0, math.log(3)],
    "pow": [4, 0, 0.25, 1, 9],
    "exp": [math.exp(v) for v in (-2, 0, 0.5, 1, 3)],
    "normalize": ((X - X.mean()) / X.std()).tolist(),
    "sigmoid": [1 / (1 + math.exp(-v)) for v in (-2, 0, 0.5, 1, 3)],
    "tanh": [math.tanh(v) for v in (-2, 0, 0.5, 1, 3)],
    "minmax": [0, 0.4, 0.5, 0.6, 1.0],
}


@pytest.mark.parametrize("op", list(PRE_OPS))
def test_pre_op(op):
    assert PRE_OPS[op](X.clone()).tolist() == pytest.approx(PRE_EXPECTED[op], rel=1e-5, abs=1e-6)
    assert PRE_OPS[op](X.clone()).shape == X.shape


def test_normalize_of_a_constant_is_zero():
    assert PRE_OPS["normalize"](torch.ones(4)).tolist() == [0, 0, 0, 0]


Y = torch.tensor([1.0, 2.0, 2.0, 3.0, 12.0])
RED_EXPECTED = {
    "median": 2.0, "mean": 4.0, "sum": 20.0, "max": 12.0, "min": 1.0,
    "var": float(np.var([1, 2, 2, 3, 12], ddof=1)), "std": float(np.std([1, 2, 2, 3, 12], ddof=1)),
    "l1": 4.0, "fro": math.sqrt(1 + 4 + 4 + 9 + 144),
    "entropy": -sum(p * math.log(p) for p in np.array([1, 2, 2, 3, 12]) / 20),
    "gmean": (1 * 2 * 2 * 3 * 12) ** 0.2,
    "outlier": 0.2,  # 12 > 2 * mean(4): with outlier(2)
}


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_reduction(name):
    arg = 2.0 if name == "outlier" else None
    assert REDUCTIONS[name].fn(Y, arg, {}) == pytest.approx(RED_EXPECTED[name], rel=1e-6)


def test_outlier_defaults_to_owl_m_and_gmean_of_a_zero_is_zero():
    assert REDUCTIONS["outlier"].fn(Y, None, {"owl_m": 2.0}) == pytest.approx(0.2)
    assert REDUCTIONS["outlier"].fn(Y, None, {}) == 0.0
    assert REDUCTIONS["gmean"].fn(torch.tensor([0.0, 4.0]), None, {}) == 0.0


V = np.array([0.2, -0.5, 1.5, 0.9])
SCALED01 = (V - V.min()) / (V.max() - V.min())
POST_EXPECTED = {
    "identity": V, "neg": -V, "abs": np.abs(V), "sin": np.sin(V), "cos": np.cos(V), "tan": np.tan(SCALED01),
    "asin": np.arcsin(SCALED01), "acos": np.arccos(SCALED01), "atan": np.arctan(V), "sinh": np.sinh(V),
    "cosh": np.cosh(V), "tanh": np.tanh(V), "exp": np.exp(V), "log": np.log(1 + SCALED01),
    "sqrt": np.sqrt(1 + SCALED01), "sigmoid": 1 / (1 + np.exp(-V)), "softplus": np.log1p(np.exp(V)),
}


@pytest.mark.parametrize("op", list(POST_OPS))
def test_post_op(op):
    assert parse(f"mean>{op}").transform(V).tolist() == pytest.approx(POST_EXPECTED[op].tolist(), rel=1e-12)


def test_post_ops_chain_in_order_and_overflow_is_refused():
    # DSA's example: atan, then asin (atan's outputs min-max scaled into [0, 1] first)
    a = np.arctan(V)
    assert parse("var>atan,asin").transform(V).tolist() == pytest.approx(
        np.arcsin((a - a.min()) / (a.max() - a.min())).tolist())
    with pytest.raises(UserError, match="non-finite values for layers \\[1\\]"):
        parse("mean>exp").transform([1.0, 1000.0])


def test_expression_statistic_is_pre_then_reduce():
    e = parse("abs,pow>mean")
    assert e.statistic(torch.tensor([-1.0, 2.0, -3.0]), {}) == pytest.approx(14 / 3)


def test_expression_ratios_use_the_dsa_mapping_and_owl_on_request():
    # v = 1, 3, 2, 5: m = minmax(v) = 0, .5, .25, 1; DSA: R = p + 2 alpha (m - mean m): higher v, more sparsity
    alloc = allocate("expr:mean", [1.0, 3.0, 2.0, 5.0], [1, 1, 1, 1], 0.5, alpha=0.1)
    assert alloc.ratios == pytest.approx([0.4125, 0.5125, 0.4625, 0.6125])
    assert alloc.extras["E"] == [1.0, 3.0, 2.0, 5.0]
    # @owl: d = minmax(v) * 0.2 = 0, .1, .05, .2; mean .0875; R = p + mean - d: higher v, lower sparsity
    alloc = allocate("expr:mean@owl", [1.0, 3.0, 2.0, 5.0], [1, 1, 1, 1], 0.5, alpha=0.1)
    assert alloc.ratios == pytest.approx([0.5875, 0.4875, 0.5375, 0.3875])


# ---- DLP and OWL as expressions, on a tiny model -------------------------------------------------------------

def _stats(model, name, **params):
    params = {"alpha": 0.1, "reducer": "median", "owl_m": 5.0, "owl_lambda": 0.08, "method": "wanda", **params}
    return dense_layer_statistics(model, capture_block_inputs(model, WINDOWS), name, params)


def test_dlp_is_the_expression_median():
    model = tiny_llama(seed=11, num_hidden_layers=6)
    sizes = [1] * 6
    s_dlp, s_expr = _stats(model, "dlp"), _stats(model, "expr:median")
    assert s_dlp == s_expr  # the same statistic, bit for bit
    dlp = allocate("dlp", s_dlp, sizes, 0.6, alpha=0.1)
    assert max(dlp.ratios) - min(dlp.ratios) == pytest.approx(0.2)
    for name in ("expr:median", "expr:median>neg@owl"):  # the DSA mapping, or OWL's of the negated statistic
        assert allocate(name, s_expr, sizes, 0.6, alpha=0.1).ratios == pytest.approx(dlp.ratios, abs=1e-12)
    for reducer in ("mean", "max", "std"):  # --reducer's others too
        s = _stats(model, "dlp", reducer=reducer)
        assert allocate(f"expr:{reducer}", s, sizes, 0.6, alpha=0.1).ratios == pytest.approx(
            allocate("dlp", s, sizes, 0.6, alpha=0.1).ratios, abs=1e-12)


def test_owl_is_the_expression_outlier_neg():
    model = tiny_llama(seed=12, num_hidden_layers=6)
    sizes = [3, 1, 2, 1, 1, 2]
    for m in (2.0, 5.0):
        s_owl = _stats(model, "owl", owl_m=m)
        assert s_owl == _stats(model, "expr:outlier", owl_m=m) == _stats(model, f"expr:outlier({m:g})")
        owl = allocate("owl", s_owl, sizes, 0.6, owl_lambda=0.08)
        expr = allocate(f"expr:outlier({m:g})>neg", s_owl, sizes, 0.6, alpha=0.08)
        assert expr.ratios == pytest.approx(owl.ratios, abs=1e-12)
        same = allocate(f"expr:outlier({m:g})@owl", s_owl, sizes, 0.6, alpha=0.08)
        assert same.ratios == owl.ratios  # exactly: the same statistic and OWL's mapping


def test_prune_with_dlp_and_its_expression_gives_the_same_weights():
    a, b = tiny_llama(seed=13), tiny_llama(seed=13)
    prune_model(a, WINDOWS, PruneSettings(0.6, "wanda", "dlp", alpha=0.1))
    prune_model(b, WINDOWS, PruneSettings(0.6, "wanda", "expr:median", alpha=0.1))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


# ---- end to end ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("allocation, method", [("global", "wanda"), ("global", "magnitude"), ("lamp", "wanda"),
                                                ("lamp", "magnitude"), ("er", "wanda"), ("er-plus", "wanda"),
                                                ("alphapruning", "wanda"), ("expr:abslog>var>atan,asin", "wanda")])
def test_prune_meets_the_target_with_each_new_allocator(allocation, method):
    model = tiny_llama(seed=14)
    result = prune_model(model, WINDOWS, PruneSettings(0.6, method, allocation, alpha=0.05))
    sizes = result.block_sizes
    assert weighted(result.realized, sizes) == pytest.approx(0.6, abs=0.005)
    assert weighted(result.allocation.ratios, sizes) == pytest.approx(0.6, abs=1e-9)
    if allocation in ("global", "lamp", "alphapruning") or allocation.startswith("expr:"):
        assert max(result.allocation.ratios) - min(result.allocation.ratios) > 1e-3
    if allocation == "er-plus":  # the last block holds the dense matrix: fewer of its weights go
        assert result.allocation.ratios[-1] < result.allocation.ratios[0]


def test_allocators_that_read_no_activations_need_no_calibration():
    assert not needs_calibration(PruneSettings(0.5, "magnitude", "er"))
    assert not needs_calibration(PruneSettings(0.5, "magnitude", "alphapruning"))
    assert not needs_calibration(PruneSettings(0.5, "magnitude", "global"))
    assert needs_calibration(PruneSettings(0.5, "magnitude", "lamp")) is False
    assert needs_calibration(PruneSettings(0.5, "magnitude", "expr:median>neg", alpha=0.1))
    model = tiny_llama(seed=15)
    result = prune_model(model, None, PruneSettings(0.5, "magnitude", "alphapruning"))
    assert weighted(result.realized, result.block_sizes) == pytest.approx(0.5, abs=0.005)


def test_cli_settings_accept_registry_names_and_expressions():
    from dlp_deploy.prune.settings import prune_settings

    assert prune_settings(0.7, "wanda", "expr:abslog>var>atan,asin", None).alpha == 0.15  # DLP's App. G default
    assert prune_settings(0.7, "wanda", "lamp", None).alpha is None
    assert set(ALLOCATORS) >= {"global", "er", "er-plus", "lamp", "alphapruning"}
    with pytest.raises(UserError, match="unknown pre-op 'zzz'"):
        prune_settings(0.7, "wanda", "expr:zzz>mean", None)
