"""The engine's paged KV pool: page allocator, reference counts and freeing, copy on write of a partial last
page, pool exhaustion, growth, and trees that do not depend on the page size."""

from __future__ import annotations

import numpy as np
import pytest

from prs_jax.models import load_causal_lm, load_tokenizer
from prs_jax.tree.engine import EngineConfig, TreeEngine
from prs_jax.tree.pages import PageAllocator, PoolExhausted
from prs_jax.tree.sampling import SamplingParams


@pytest.fixture(scope="module")
def model_tok(llama_dir):
    return load_causal_lm(llama_dir), load_tokenizer(llama_dir)


def test_allocator_counts_frees_and_grows():
    a = PageAllocator(max_pages=8, initial_pages=2, page_size=4, page_bytes=100)
    assert (a.allocated, a.free, a.used) == (2, 8, 0)
    assert a.need(5, "x") == 8  # one growth step: 2 -> 8
    a.grow(8)
    x = a.alloc(3, "x")
    y = a.alloc(2, "y")
    assert x == [0, 1, 2] and y == [3, 4]  # lowest ids first
    a.incref(x[:2])  # a second table shares two pages
    a.decref(x)
    assert a.used == 4 and a.refcount[2] == 0  # x[2] freed, the shared two survive
    a.decref(x[:2])
    assert a.used == 2 and a.peak == 5
    assert a.stats().as_dict()["bytes_peak"] == 500
    assert a.pages_for(0, 1) == 1 and a.pages_for(4, 8) == 1 and a.pages_for(6, 8) == 1 and a.pages_for(6, 9) == 2
    assert a.pages_for(6, 6) == 1 and a.pages_for(8, 8) == 0  # a partial page is copied even for no tokens
    with pytest.raises(PoolExhausted, match=r"7 pages of 4 tokens needed, 6 free of 8 .*Raise EngineConfig\.pool_"):
        a.need(7, "expand")
    with pytest.raises(RuntimeError, match="unreferenced"):
        a.decref(y + y)


def _pool(eng):
    return np.asarray(eng.kv_pool())


def test_release_returns_subtree_pages_and_keeps_shared_ancestors(model_tok):
    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=0, config=EngineConfig(page_size=4))
    (root,) = eng.add_prompts([list(range(5, 15))])  # 10 tokens: pages 0-3, 4-7, 8-9 (partial)
    assert len(root.block_table) == 3 and eng.kv_stats()["pages_used"] == 3
    kids = eng.expand([root], 2, SamplingParams(greedy=True), max_new_tokens=7, stop=None)[0]
    after_kids = eng.kv_stats()["pages_used"]
    grand = eng.expand([kids[0]], 2, SamplingParams(temperature=1.0), max_new_tokens=5)[0]
    for k in kids:  # shared: the root's two full pages; own: a copy of the root's partial page and more
        assert k.block_table[:2] == root.block_table[:2] and k.block_table[2] != root.block_table[2]
        assert len(k.block_table) == -(-(10 + len(k.tokens)) // 4)
    assert eng.pages.refcount[root.block_table[0]] == 1 + 2 + 2  # root, two kids, two grandchildren
    stats = eng.kv_stats()
    assert stats["pages_used"] > after_kids and stats["pages_peak"] >= stats["pages_used"]
    assert stats["bytes_used"] == stats["pages_used"] * stats["page_bytes"]
    own = len(kids[0].block_table) - 2
    eng.release([kids[0]] + grand)  # a released subtree gives back all its own pages
    assert eng.kv_stats()["pages_used"] == after_kids - own
    assert kids[0].block_table is None and root.block_table is not None
    # the shared ancestor pages survive: building on the root again gives the same greedy child
    again = eng.expand([root], 1, SamplingParams(greedy=True), max_new_tokens=7)[0][0]
    assert again.tokens == kids[0].tokens
    with pytest.raises(RuntimeError, match=r"node #\d+ has no KV \(released"):
        eng.expand([kids[0]], 1, max_new_tokens=2)
    eng.release(list(eng.tree))
    assert eng.kv_stats()["pages_used"] == 0 and not eng.pages.refcount.any()
    eng.release(list(eng.tree))  # twice: nothing happens


def test_copy_on_write_of_a_partial_last_page(model_tok):
    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=0, config=EngineConfig(page_size=4))
    (root,) = eng.add_prompts([[5, 6, 7, 8, 9, 10]])  # positions 0-5: page b holds 4, 5 and two empty slots
    a, b = root.block_table
    before = _pool(eng)[:, :, b].copy()
    assert np.all(before[:, :, 1] == 0)  # the root's last token (position 5) is not computed yet
    kids = eng.expand([root], 2, SamplingParams(temperature=1.0), max_new_tokens=6)[0]
    pool = _pool(eng)
    assert root.kv_valid == len(root.tokens)  # completed by the first child's row
    assert np.any(pool[:, :, b, 1] != 0)
    np.testing.assert_array_equal(pool[:, :, b, 0], before[:, :, 0])
    np.testing.assert_array_equal(pool[:, :, b, 2:], before[:, :, 2:])  # the children never wrote the root's page
    copies = [k.block_table[1] for k in kids]
    assert len({b, *copies}) == 3
    for k, c in zip(kids, copies):
        assert k.block_table[0] == a
        np.testing.assert_array_equal(pool[:, :, c, :2], pool[:, :, b, :2])  # the copied head, last token included
        assert np.any(pool[:, :, c, 2] != 0)  # the child's first token (position 6) in its own copy
    assert not np.array_equal(pool[:, :, copies[0], 2:], pool[:, :, copies[1], 2:])


def test_pool_exhaustion_names_the_key_and_changes_nothing(model_tok):
    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=0, config=EngineConfig(page_size=4, pool_pages=4, initial_pool_pages=1))
    with pytest.raises(PoolExhausted, match=r"add_prompts: the KV pool is exhausted: 5 pages of 4 tokens needed, "
                                            r"4 free of 4 .*Raise EngineConfig\.pool_pages"):
        eng.add_prompts([list(range(5, 25))])
    assert len(eng.tree) == 0
    (root,) = eng.add_prompts([list(range(5, 11))])  # 2 pages; the pool grows 1 -> 4
    assert eng.kv_stats()["pages_allocated"] == 4
    with pytest.raises(PoolExhausted, match=r"expand .*: the KV pool is exhausted: 8 pages .* 2 free of 4"):
        eng.expand([root], 2, max_new_tokens=12)
    assert root.branches == 0  # checked before any randomness was spent: a retry samples the same tree
    kids = eng.expand([root], 2, SamplingParams(greedy=True), max_new_tokens=2)[0]  # fits: 1 page each
    assert eng.kv_stats()["pages_used"] == 4 and all(len(k.tokens) == 2 for k in kids)


def test_trees_do_not_depend_on_page_size_or_pool_growth(model_tok):
    model, tok = model_tok

    def run(**kw):
        eng = TreeEngine(model, tok, seed=4, config=EngineConfig(**kw))
        roots = eng.add_prompts(["one two three four five", "six", [5, 9, 13, 17, 21, 25, 29]])
        kids = eng.expand(roots, 3, SamplingParams(temperature=1.0), max_new_tokens=9)
        asks = eng.append([kids[0][1], kids[0][1], roots[1]], [" ok then", " and", " so"])
        eng.expand(asks + [kids[2][0]], 2, SamplingParams(temperature=0.8), max_new_tokens=6)
        return [(n.tokens, np.asarray(n.logprobs or [], np.float32).tobytes()) for n in eng.tree]

    base = run()
    assert run(page_size=3, initial_pool_pages=1) == base  # bitwise: tokens and log-probs
    assert run(page_size=64) == base


def test_nan_in_every_free_page_never_reaches_a_tree(model_tok):
    """Pages and slots no block table covers are NaN: every read is in bounds and masked, so trees are bitwise
    the same as over a zero-filled pool."""
    import jax.numpy as jnp

    model, tok = model_tok

    def run(poison):
        eng = TreeEngine(model, tok, seed=6, config=EngineConfig(page_size=4))
        roots = eng.add_prompts(["one two three four five", [5, 9, 13, 17, 21, 25, 29]])

        def nan_free():
            if poison:
                free = np.flatnonzero(eng.pages.refcount == 0)
                eng._pool = eng.kv_pool().at[:, :, jnp.asarray(free)].set(jnp.nan)

        nan_free()
        kids = eng.expand(roots, 2, SamplingParams(temperature=1.0), max_new_tokens=7)
        nan_free()
        asks = eng.append([kids[0][1], kids[1][0]], [" ok then", " and"])
        nan_free()
        eng.expand(asks + [kids[1][1]], 2, SamplingParams(temperature=0.8), max_new_tokens=6)
        return [(n.tokens, np.asarray(n.logprobs or [], np.float32).tobytes()) for n in eng.tree]

    poisoned = run(True)
    assert all(np.isfinite(np.frombuffer(lp, np.float32)).all() for _, lp in poisoned)
    assert poisoned == run(False)


def test_completion_reaches_a_copy_made_by_an_earlier_program(model_tok):
    """Two appends to one incomplete parent in separate programs, the copying one first: the parent's last
    token, computed by the later program, lands in the parent's page and in the earlier copy."""
    from prs_jax.tree.engine import Stop

    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=0, config=EngineConfig(page_size=4, group_tile=1))
    (root,) = eng.add_prompts([[5, 6, 7, 8, 9, 10]])
    (kid,) = eng.expand([root], 1, SamplingParams(greedy=True), max_new_tokens=3, stop=Stop(eos_ids=()))[0]
    assert kid.context_len == 9 and kid.kv_valid == 2  # position 8 (page 2, slot 0) not computed yet
    # one program per item; the short items' programs run first (smaller bucket), so the long item's program
    # writes the parent's last token into its page and three earlier copies (more than two per row)
    long, *shorts = eng.append([kid] * 4, [list(range(20, 40)), [41], [42], [43]])
    pool = _pool(eng)
    own = kid.block_table[2]
    assert kid.kv_valid == 3 and np.any(pool[:, :, own, 0] != 0)
    for node in (long, *shorts):
        assert node.block_table[:2] == kid.block_table[:2] and node.block_table[2] != own
        np.testing.assert_array_equal(pool[:, :, node.block_table[2], 0], pool[:, :, own, 0])


def test_release_descendants_keeps_the_parents_and_gives_back_the_rest(model_tok):
    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=0, config=EngineConfig(page_size=4))
    roots = eng.add_prompts([list(range(5, 12)), list(range(20, 29))])
    drafts = eng.expand(roots, 2, SamplingParams(temperature=1.0), max_new_tokens=5)
    flat = [d for ds in drafts for d in ds]
    base = eng.kv_stats()["pages_used"]
    first = eng.expand(flat, 2, SamplingParams(temperature=1.0), max_new_tokens=6)
    eng.expand([first[0][0]], 2, SamplingParams(temperature=1.0), max_new_tokens=3)
    eng.release_descendants(flat)
    assert eng.kv_stats()["pages_used"] == base
    assert all(d.block_table is not None for d in flat) and all(k.block_table is None for ks in first for k in ks)
    second = eng.expand(flat, 2, SamplingParams(temperature=1.0), max_new_tokens=6)  # the parents still build
    assert len(second) == len(flat) and eng.kv_stats()["pages_used"] > base
    eng.release_tree(roots)  # the whole tree: every page back, the nodes' text stays
    assert eng.kv_stats()["pages_used"] == 0 and all(n.block_table is None for n in eng.tree)
    assert all(k.tokens for ks in second for k in ks)
    eng.clear()  # a new, empty tree; the same prompts draw the same keys as in a new engine
    again = eng.expand(eng.add_prompts([list(range(5, 12)), list(range(20, 29))]), 2,
                       SamplingParams(temperature=1.0), max_new_tokens=5)
    assert [[k.tokens for k in ks] for ks in again] == [[k.tokens for k in ks] for ks in drafts]
    assert len(eng.tree) == 2 + 4
