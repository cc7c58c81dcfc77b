import pytest
import torch

from compressor.allocate import BudgetError, Shape, given_ranks, global_ranks, removed_params, uniform_ranks


def _shapes():
    shapes = {}
    for layer in range(4):
        shapes.update({
            f"{layer}.q": Shape(256, 256), f"{layer}.k": Shape(64, 256), f"{layer}.v": Shape(64, 256),
            f"{layer}.o": Shape(256, 256), f"{layer}.gate": Shape(704, 256),
            f"{layer}.up": Shape(704, 256), f"{layer}.down": Shape(256, 704),
        })
    return shapes


def _removed_fraction(shapes, ranks):
    return removed_params(shapes, ranks) / sum(s.dense for s in shapes.values())


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_uniform_hits_budget_and_alignment(ratio):
    shapes = _shapes()
    ranks = uniform_ranks(shapes, ratio, align=8)
    assert _removed_fraction(shapes, ranks) == pytest.approx(ratio, rel=0.005)
    assert all(r is None or r % 8 == 0 for r in ranks.values())


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_global_hits_budget_and_alignment_and_follows_costs(ratio):
    shapes = _shapes()
    gen = torch.Generator().manual_seed(0)
    costs = {}
    for name, shape in shapes.items():
        k = min(shape.out_features, shape.in_features)
        decay = torch.linspace(1, 0, k) ** 2 + 1e-3
        # Layer 0 is a hundred times more sensitive than the others.
        costs[name] = decay * (100.0 if name.startswith("0.") else 1.0) * (1 + 0.1 * torch.rand(k, generator=gen))
    ranks = global_ranks(shapes, costs, ratio, align=8)
    assert _removed_fraction(shapes, ranks) == pytest.approx(ratio, rel=0.005)
    assert all(r is None or r % 8 == 0 for r in ranks.values())
    kept = lambda prefix: sum(shapes[n].stored(ranks[n]) for n in shapes if n.startswith(prefix))
    assert kept("0.") > kept("1.")


def test_matrix_stays_dense_where_low_rank_is_not_smaller():
    shapes = {**_shapes(), "small": Shape(16, 16)}
    ranks = uniform_ranks(shapes, 0.2, align=8)
    assert ranks["small"] is None  # rank 8 of a 16x16 would store 256 params: no saving
    assert Shape(16, 16).max_useful_rank(8) == 0
    assert _removed_fraction(shapes, ranks) == pytest.approx(0.2, rel=0.005)  # the others took its part


def test_max_kept_fraction_keeps_matrices_dense_rather_than_barely_cut():
    shapes = _shapes()
    costs = {name: torch.linspace(1, 0, min(s.out_features, s.in_features)) ** 2 + 1e-3 for name, s in shapes.items()}
    ranks = global_ranks(shapes, costs, 0.2, align=8, max_kept=0.5)
    assert _removed_fraction(shapes, ranks) == pytest.approx(0.2, rel=0.005)
    cut = [name for name, rank in ranks.items() if rank is not None]
    assert cut and len(cut) < len(shapes)  # some cut deep, the rest left dense
    assert all(shapes[name].low_rank(ranks[name]) <= 0.5 * shapes[name].dense for name in cut)
    # Uniform would keep 80% of every matrix: it says so instead of missing the budget.
    with pytest.raises(BudgetError, match="max_kept_fraction 0.5.*global"):
        uniform_ranks(shapes, 0.2, align=8, max_kept=0.5)
    ranks = uniform_ranks(shapes, 0.6, align=8, max_kept=0.5)  # 40% kept: within the cap
    assert all(r is None or shapes[n].low_rank(r) <= 0.5 * shapes[n].dense for n, r in ranks.items())


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval_is_refused(ratio):
    with pytest.raises(BudgetError, match=r"ratio must be in \(0, 1\)"):
        uniform_ranks(_shapes(), ratio)


def test_unreachable_budget_is_refused():
    shapes = {"a": Shape(64, 64)}
    with pytest.raises(BudgetError, match="Cannot remove"):
        uniform_ranks(shapes, 0.33, align=32)


def test_measured_costs_are_anchored_on_the_probe_and_superlinear():
    from compressor.allocate import measured_costs

    energy = {"a": torch.tensor([8.0, 4.0, 2.0, 1.0]), "b": torch.tensor([1.0, 1.0])}
    costs = measured_costs(energy, {"a": 2, "b": None}, {"a": 0.5}, gamma=3.0)
    # Dropping the probe's tail (bases 2, 3) costs exactly the measured KL.
    assert float(costs["a"][2:].sum()) == pytest.approx(0.5)
    # Superlinear: dropping twice the energy costs 2**3 times more.
    dropped_double = energy["a"][1:].sum() / energy["a"][2:].sum()
    assert float(costs["a"][1:].sum()) == pytest.approx(0.5 * float(dropped_double) ** 3)
    assert (costs["a"] >= 0).all()
    # Not probed: priced with the largest scale, so it is cut last.
    assert float(costs["b"].sum()) > 0


def test_given_ranks_are_checked_against_the_shapes():
    shapes = {"a": Shape(64, 32), "b": Shape(16, 16)}
    assert given_ranks(shapes, {"a": 8}) == {"a": 8, "b": None}  # not named: dense
    with pytest.raises(BudgetError, match="does not have"):
        given_ranks(shapes, {"a": 8, "c": 4})
    with pytest.raises(BudgetError, match="allows 1 to 21"):  # 22 * (64 + 32) > 64 * 32
        given_ranks(shapes, {"a": 22})
    with pytest.raises(BudgetError, match="rank of b is 0"):
        given_ranks(shapes, {"b": 0})


def _brute_force(shapes, costs, align, min_rank):
    """Every allocation: (parameters removed, total modelled cost, ranks)."""
    import itertools

    choices = {}
    for name, shape in shapes.items():
        tail = costs[name].double().flip(0).cumsum(0).flip(0).tolist() + [0.0]
        top = shape.max_useful_rank(align)
        choices[name] = [(0, 0.0, None)] + [(shape.dense - shape.low_rank(r), tail[r], r)
                                            for r in range(top, min_rank - 1, -align)]
    names = list(shapes)
    for combo in itertools.product(*(choices[name] for name in names)):
        yield sum(c[0] for c in combo), sum(c[1] for c in combo), {name: c[2] for name, c in zip(names, combo)}


def _modelled(shapes, costs, ranks):
    removed = sum(shape.dense - shape.stored(ranks[name]) for name, shape in shapes.items())
    cost = sum(float(costs[name][ranks[name]:].double().sum()) for name in shapes if ranks[name] is not None)
    return removed, cost


def test_hull_allocation_is_the_brute_force_optimum_for_what_it_removes():
    from compressor.allocate import hull_ranks

    generator = torch.Generator().manual_seed(0)
    shapes = {"a": Shape(48, 32), "b": Shape(40, 40), "c": Shape(32, 56)}
    for trial in range(20):
        # Non-convex tails: the first bases after a cut can be cheap, later ones costly, and back.
        costs = {name: torch.rand(min(s.out_features, s.in_features), generator=generator) ** 3
                 for name, s in shapes.items()}
        ranks = hull_ranks(shapes, costs, 0.3, align=4, tolerance=0.2)
        removed, cost = _modelled(shapes, costs, ranks)
        best = min(c for r, c, _ in _brute_force(shapes, costs, 4, 4) if r >= removed)
        assert cost == pytest.approx(best, rel=1e-9, abs=1e-12), trial


def test_hull_allocation_cuts_a_matrix_whose_first_step_is_dear_but_later_ones_cheap():
    from compressor.allocate import hull_ranks

    shapes = {"a": Shape(64, 64), "b": Shape(64, 64)}
    # a: the bases beyond its largest useful rank (24) cost 1 in all, the next ones nearly nothing;
    # b: its first move is nearly free, its next two chunks cost 0.6 each. The greedy prices a's
    # first move alone (1 per 1024 parameters), so it cuts b deeper (0.6 per 1024) instead.
    costs = {"a": torch.cat([torch.full((24,), 1e-6), torch.full((40,), 1 / 40)]),
             "b": torch.cat([torch.full((8,), 1.0), torch.full((16,), 0.075), torch.full((40,), 1e-6)])}
    greedy = global_ranks(shapes, costs, 0.375, align=8, tolerance=0.01)
    hull = hull_ranks(shapes, costs, 0.375, align=8, tolerance=0.01)
    assert _modelled(shapes, costs, greedy) == pytest.approx((3072, 1.2 + 40e-6))
    assert _modelled(shapes, costs, hull) == pytest.approx((3072, 1.0 + 48e-6))  # b to 24, a to 16
