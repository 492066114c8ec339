"""The executor's read planner (pure host-side packing): budgets hold with every floor, each row is planned
exactly once, and stable shapes depend on a group's own lengths only."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prs_jax.tree.executor import ReadGroup, ReadLimits, group_bytes, plan_reads


def _groups(rng, count):
    return [ReadGroup(None, int(rng.integers(0, 90)), [[1] * int(rng.integers(1, 70))
                                                       for _ in range(int(rng.integers(1, 9)))])
            for _ in range(count)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), floor=st.sampled_from([1, 4, 32]), stable=st.sampled_from([0, 2, 4]),
       budget=st.sampled_from([256, 1024, 1 << 16]), max_rows=st.sampled_from([4, 16, 256]))
def test_every_row_once_and_budgets_hold(seed, floor, stable, budget, max_rows):
    rng = np.random.default_rng(seed)
    groups = _groups(rng, int(rng.integers(1, 12)))
    heads = 4
    limits = ReadLimits(max_rows=max_rows, token_budget=budget, activation_budget_bytes=8 * heads * 64 * 512,
                        min_row_bucket=8, min_groups_bucket=floor, stable_rows=stable, stable_groups=8)
    chunks = plan_reads(groups, limits, heads, min_prefix_bucket=16)
    seen = [(gi, r) for c in chunks for gi, rows in c.members for r in rows]
    assert sorted(seen) == [(gi, r) for gi, g in enumerate(groups) for r in range(len(g.rows))]
    for c in chunks:
        assert len(c.members) <= c.g and all(len(rows) <= c.n for _, rows in c.members)
        for gi, rows in c.members:
            assert groups[gi].prefix_len <= c.p and all(len(groups[gi].rows[r]) <= c.t for r in rows)
        one_row = c.g * c.n == 1
        # the group floor (and stable padding) never takes a program past a budget a single group fits in
        if c.n * (c.p + c.t) <= budget and c.n <= max_rows and group_bytes(heads, c.n, c.p, c.t) <= \
                limits.activation_budget_bytes:
            assert c.g * c.n * (c.p + c.t) <= budget and c.g * c.n <= max_rows or one_row
            assert c.g * group_bytes(heads, c.n, c.p, c.t) <= limits.activation_budget_bytes or one_row


def test_stable_shapes_depend_on_a_groups_own_lengths():
    rng = np.random.default_rng(0)
    groups = _groups(rng, 10)
    limits = ReadLimits(token_budget=4096, stable_rows=4, stable_groups=8, min_row_bucket=8)

    def shapes(gs, index):
        out = {}
        for c in plan_reads(gs, limits, 4, min_prefix_bucket=16):
            for gi, rows in c.members:
                for r in rows:
                    out[(index[gi], r)] = (c.g, c.n, c.p, c.t)
        return out

    together = shapes(groups, list(range(10)))
    for i in range(10):
        assert shapes([groups[i]], [i]) == {k: v for k, v in together.items() if k[0] == i}


def test_limits_are_validated():
    with pytest.raises(ValueError, match="token_budget must be >= 1"):
        ReadLimits(token_budget=0)
    with pytest.raises(ValueError, match="stable_rows must be >= 0"):
        ReadLimits(stable_rows=-1)


def test_length_bucket_half_octaves():
    from prs_jax.tree.executor import length_bucket

    got = {x: length_bucket(x, 8) for x in (1, 8, 9, 12, 13, 17, 25, 33, 46, 49, 65, 129)}
    assert got == {1: 8, 8: 8, 9: 12, 12: 12, 13: 16, 17: 24, 25: 32, 33: 48, 46: 48, 49: 64, 65: 96, 129: 192}
    assert [length_bucket(x, 8, fine=False) for x in (9, 33, 46, 65)] == [16, 64, 64, 128]
    for x in range(9, 2000):  # never below x, under 1.5x above the floor
        assert x <= length_bucket(x, 8) < 1.5 * x
