"""The tree engine: shared-prefix expansion equals decoding each sequence alone; determinism; stop strings;
greedy parity with transformers; compilation counts; bad inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prs_jax.models import load_causal_lm, load_tokenizer
from prs_jax.tree.engine import EngineConfig, TreeEngine
from prs_jax.tree.sampling import SamplingParams
from prs_jax.tree.tree import render


@pytest.fixture(scope="module")
def model_tok(llama_dir):
    return load_causal_lm(llama_dir), load_tokenizer(llama_dir)


def _logprobs_alone(model, node, run_padded):
    """Log-probs of node's tokens from one full forward over its context (no cache, no sharing)."""
    ctx = node.context_tokens()
    logits = run_padded(model, ctx)
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1))
    start = len(ctx) - len(node.tokens)
    return np.array([lp[start - 1 + i, t] for i, t in enumerate(node.tokens)])


def test_siblings_match_full_sequence_forward_through_fixed_nodes(model_tok, run_padded):
    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=0)
    roots = eng.add_prompts(["Hello there, how are you today?", "A", [5, 9, 13]])
    drafts = eng.expand(roots, 3, SamplingParams(temperature=1.0, top_k=100), max_new_tokens=9)
    asks = eng.append([drafts[0][1], drafts[1][0], roots[2]], [" Feedback please:", " ok", " then"])
    second = eng.expand(asks, 2, SamplingParams(temperature=0.7), max_new_tokens=7)
    third = eng.expand([second[0][0]], 2, SamplingParams(greedy=True), max_new_tokens=5)
    for node in [k for ks in drafts + second + third for k in ks]:
        np.testing.assert_allclose(node.logprobs, _logprobs_alone(model, node, run_padded), atol=1e-4)
    assert "[prompt #0]" in render(roots[0]) and "[fixed" in render(roots[0])
    # the same parent expanded twice gives different children (fresh keys), both correct
    again = eng.expand([roots[0]], 3, SamplingParams(temperature=1.0, top_k=100), max_new_tokens=9)[0]
    assert [k.tokens for k in again] != [k.tokens for k in drafts[0]]


def test_seed_determines_tree_independent_of_batching(model_tok):
    model, tok = model_tok
    prompts = ["one two three", "four five", "six"]
    params = SamplingParams(temperature=1.2, top_p=0.95)

    def run(batches, seed=3, share=True, min_rows=0):
        eng = TreeEngine(model, tok, seed=seed, config=EngineConfig(share_prefix=share, min_rows_bucket=min_rows))
        roots = eng.add_prompts(prompts)
        out = {}
        for b in batches:
            for i, kids in zip(b, eng.expand([roots[i] for i in b], 4, params, max_new_tokens=8)):
                out[i] = [k.tokens for k in kids]
        return out

    together = run([[0, 1, 2]])
    assert together == run([[2], [0, 1]])  # batching does not change the tree
    assert together == run([[0, 1, 2]], share=False)  # copied-prefix path: same samples
    assert together == run([[0, 2], [1]], share="auto")  # chosen per parent: same samples
    assert together != run([[0, 1, 2]], seed=4)
    assert together == run([[0, 2], [1]], min_rows=8)  # children padded to 8 rows per parent: same samples


def test_auto_prefix_sharing_is_decided_per_parent(model_tok):
    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=0, config=EngineConfig(share_prefix="auto", share_min_ratio=0.5))
    short, long_ = eng.add_prompts([[5, 6, 7], list(range(10, 40))])  # prefixes of 2 and 29 tokens
    assert not eng.shares_prefix(short, 4, 16) and eng.shares_prefix(long_, 4, 16)
    assert not eng.shares_prefix(long_, 1, 16)  # one child: nothing to share
    assert eng.shares_prefix(short, 4, 4)  # 2 >= 0.5 x 4
    kids = eng.expand([short, long_], 4, SamplingParams(greedy=True), max_new_tokens=16)
    st = eng.last_decode_stats
    assert st["parents_shared"] == 1 and st["parents_copied"] == 1 and st["programs"] == 2
    for mode in (True, False):  # greedy: the same children whichever path ran them
        ref = TreeEngine(model, tok, seed=0, config=EngineConfig(share_prefix=mode))
        roots = ref.add_prompts([[5, 6, 7], list(range(10, 40))])
        assert [[k.tokens for k in ks] for ks in ref.expand(roots, 4, SamplingParams(greedy=True),
                                                             max_new_tokens=16)] == \
            [[k.tokens for k in ks] for ks in kids]
    with pytest.raises(ValueError, match="share_prefix"):
        EngineConfig(share_prefix="sometimes")


def test_greedy_engine_matches_transformers_generate(model_tok, llama_dir, hf_ref):
    import torch

    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=0)
    prompts = [[7, 8, 9, 10, 11, 12], [20, 21], [30, 31, 32, 33]]
    roots = eng.add_prompts(prompts)
    kids = eng.expand(roots, 1, SamplingParams(greedy=True), max_new_tokens=10)
    ref_model = hf_ref.causal_lm(llama_dir)
    for p, (k,) in zip(prompts, kids):
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                                     eos_token_id=eng.eos_ids[0], pad_token_id=0)[0, len(p):].tolist()
        assert k.tokens == ref[:len(k.tokens)]


def test_greedy_engine_matches_transformers_on_gpt_neox(make_checkpoint, hf_ref):
    """The tree engine is the only decoder (the flat one folded into it): greedy parity on a second
    architecture, batched prompts of different lengths, an EOS id that can stop rows early."""
    import torch

    path = make_checkpoint("gpt_neox")
    model = load_causal_lm(path)
    eng = TreeEngine(model, None, seed=0, eos_ids=[6], pad_id=0)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(7, 500, size=n)) for n in (9, 4, 6)]
    kids = eng.expand(eng.add_prompts(prompts), 1, SamplingParams(greedy=True), max_new_tokens=12)
    ref_model = hf_ref.causal_lm(path)
    for p, (k,) in zip(prompts, kids):
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=6,
                                     pad_token_id=0)[0, len(p):].tolist()
        assert k.tokens == ref[:len(k.tokens)] and len(k.tokens) >= 1
        assert all(lp <= 0 for lp in k.logprobs)


def test_stop_strings_cut_on_decoded_text(model_tok, run_padded):
    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=0)
    root = eng.add_prompts(["The quick brown fox"])[0]
    (free,) = eng.expand([root], 1, SamplingParams(greedy=True), max_new_tokens=24)[0]
    text = free.text
    assert len(text) > 6
    stop = text[len(text) // 2: len(text) // 2 + 3]
    (cut,) = eng.expand([root], 1, SamplingParams(greedy=True), max_new_tokens=24, stop=[stop, "\x00never"])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.find(stop)]
    assert stop in tok.decode(cut.tokens, skip_special_tokens=True)
    assert cut.tokens == free.tokens[: len(cut.tokens)] and len(cut.logprobs) == len(cut.tokens)
    # building on a stop-truncated node stays exact
    (child,) = eng.expand([cut], 1, SamplingParams(greedy=True), max_new_tokens=4)[0]
    np.testing.assert_allclose(child.logprobs, _logprobs_alone(model, child, run_padded), atol=1e-4)


def test_compilations_are_few_and_counted(model_tok):
    model, tok = model_tok
    # bucket floors that cover this workload's envelope: every call below lands in the same shapes
    eng = TreeEngine(model, tok, seed=0, config=EngineConfig(min_prefix_bucket=32, min_groups_bucket=8,
                                                             min_extend_bucket=16))

    def run(rng, rounds):
        for _ in range(rounds):
            rows = int(rng.integers(3, 9))
            roots = eng.add_prompts([list(rng.integers(7, 400, size=rng.integers(3, 14))) for _ in range(rows)])
            kids = eng.expand(roots, 2, SamplingParams(), max_new_tokens=int(rng.integers(3, 12)))
            eng.append([k[0] for k in kids], [" more"] * len(kids))

    run(np.random.default_rng(0), 2)
    warm = eng.compilations
    # at most one prefill program (prompts and fixed text alike) and one decode program; fewer if an earlier
    # engine in this process already compiled these shapes (programs are shared)
    assert warm <= 2, warm
    # more prompts of other lengths and other token budgets inside the same buckets: nothing new to compile
    run(np.random.default_rng(1), 4)
    assert eng.compilations == warm


def test_compilations_under_pool_growth(model_tok):
    """The KV pool grows 4x at a time: each pool size compiles its prefill and decode programs once, so the count
    is bounded by the number of sizes, and nothing compiles again once the pool stops growing."""
    model, tok = model_tok
    # page_size 4 and a 2-page start: the calls pass through pool sizes 2, 8, 32, 128, ...
    eng = TreeEngine(model, tok, seed=0, config=EngineConfig(
        page_size=4, initial_pool_pages=2, pool_pages=2048, min_prefix_bucket=32, min_groups_bucket=8,
        min_extend_bucket=16))
    rng = np.random.default_rng(0)
    sizes, roots = [], []
    for k in range(8):  # nothing is released: the pool has to hold every node's pages
        roots += eng.add_prompts([list(rng.integers(7, 400, size=rng.integers(3, 14))) for _ in range(1 + k)])
        eng.expand(roots[-1 - k:], 2, SamplingParams(), max_new_tokens=int(rng.integers(3, 12)))
        sizes.append(eng.kv_stats()["pages_allocated"])
    assert sizes == sorted(sizes) and len(set(sizes)) >= 3, sizes  # it grew, several times, and never shrank
    steps = [2 * 4 ** i for i in range(8) if 2 * 4 ** i <= sizes[-1]]  # every size the pool passed through
    assert set(sizes) <= set(steps), sizes
    # two programs (prefill, decode) per pool size at most (fewer when an earlier engine compiled them)
    assert eng.compilations <= 2 * len(steps), (eng.compilations, steps)
    warm = eng.compilations
    eng.release_descendants(roots)  # room inside the current pool
    for _ in range(2):
        more = eng.add_prompts([list(rng.integers(7, 400, size=rng.integers(3, 14))) for _ in range(4)])
        eng.expand(more, 2, SamplingParams(), max_new_tokens=int(rng.integers(3, 12)))
    assert eng.kv_stats()["pages_allocated"] == sizes[-1]
    assert eng.compilations == warm


def test_bad_inputs(model_tok):
    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=0)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        eng.add_prompts([""])
    with pytest.raises(ValueError, match="exceeds the model's window"):
        eng.add_prompts([[5] * (model.config.max_position_embeddings + 3)])
    root = eng.add_prompts(["hi"])[0]
    with pytest.raises(ValueError, match="n must be a positive"):
        eng.expand([root], 0, max_new_tokens=4)
    with pytest.raises(ValueError, match="stop: expected"):
        eng.expand([root], 1, max_new_tokens=4, stop=42)
    with pytest.raises(ValueError, match="stop: expected"):
        eng.expand([root], 1, max_new_tokens=4, stop=[""])
    with pytest.raises(ValueError, match="exceeds the model's window"):
        eng.expand([root], 1, max_new_tokens=model.config.max_position_embeddings)


def test_tree_json_round_trip(model_tok, tmp_path):
    import json

    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=0)
    root = eng.add_prompts(["abc"], metadata=[{"id": "p0"}])[0]
    kids = eng.expand([root], 2, max_new_tokens=3)[0]
    kids[0].reward = 0.5
    data = json.loads(eng.tree.to_json(tmp_path / "tree.json"))
    assert data[0]["metadata"] == {"id": "p0"} and len(data[0]["children"]) == 2
    assert data[0]["children"][0]["reward"] == 0.5 and data[0]["children"][0]["finish_reason"] in ("eos", "length")


def test_children_keyed_by_prompt_id_and_path_not_creation_order(model_tok):
    """A child's key comes from (seed, prompt id + tokens, path of (branch, child)): adding prompts in other
    batches and orders, expanding parents in another order or batching, and unrelated nodes created first
    change nothing; with group_tile the log-probs are bitwise equal too."""
    model, tok = model_tok
    prompts = ["one two three", "four five", "six", "seven eight nine ten"]
    params = SamplingParams(temperature=1.3, top_k=40)

    def run(add_batches, expand_batches, noise=False, tile=4):
        eng = TreeEngine(model, tok, seed=11, config=EngineConfig(group_tile=tile))
        if noise:  # unrelated nodes first: every later node id shifts
            eng.expand(eng.add_prompts(["unrelated prompt"], ids=["x"]), 2, params, max_new_tokens=3)
        roots = {}
        for b in add_batches:
            roots.update(zip(b, eng.add_prompts([prompts[i] for i in b], ids=[f"p{i}" for i in b])))
        out, drafts = {}, {}
        for b in expand_batches:
            for i, kids in zip(b, eng.expand([roots[i] for i in b], 3, params, max_new_tokens=6)):
                drafts[i] = kids
        for b in reversed(expand_batches):  # second level: append on a child, expand again
            asks = eng.append([drafts[i][1] for i in b], [" and then"] * len(b))
            for i, kids in zip(b, eng.expand(asks, 2, params, max_new_tokens=5)):
                out[i] = [(k.tokens, k.logprobs) for k in drafts[i] + kids]
        return out

    ref = run([[0, 1, 2, 3]], [[0, 1, 2, 3]])
    assert ref == run([[3], [1, 0], [2]], [[2, 0], [3, 1]], noise=True)
    assert ref == run([[2, 3, 0, 1]], [[1], [3], [0], [2]])
    untiled = run([[0, 1, 2, 3]], [[0, 1, 2, 3]], tile=0)
    assert {i: [t for t, _ in v] for i, v in untiled.items()} == {i: [t for t, _ in v] for i, v in ref.items()}

    eng = TreeEngine(model, tok, seed=11)
    a, b, c = eng.add_prompts(["same text"] * 3, ids=["a", "b", "a"])
    kids = [[k.tokens for k in ks] for ks in eng.expand([a, b, c], 3, params, max_new_tokens=6)]
    assert kids[0] != kids[1] and kids[0] != kids[2]  # another id, or the same (id, text) added again
    eng2 = TreeEngine(model, tok, seed=11)
    assert [k.tokens for k in eng2.expand(eng2.add_prompts(["same text"], ids=["a"]), 3, params,
                                          max_new_tokens=6)[0]] == kids[0]


def test_path_keys_sample_without_bias(model_tok):
    """Keys from hashed paths give uniform, uncorrelated draws, and children's first tokens follow the model's
    distribution (chi-square over the frequent tokens)."""
    from prs_jax.tree.engine import path_keys, path_words

    words = np.stack([path_words(("root",) + ((0, c),)) for c in range(20000)])
    keys = path_keys(jax.random.key(7), jnp.asarray(words))
    draw = jax.vmap(jax.random.uniform)
    u0 = np.sort(np.asarray(draw(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 0))))
    u1 = np.asarray(draw(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 1)))
    assert np.max(np.abs(u0 - (np.arange(1, 20001) - 0.5) / 20000)) < 0.015  # Kolmogorov-Smirnov, 20000 draws
    assert abs(np.corrcoef(np.asarray(draw(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 0))), u1)[0, 1]
               ) < 0.03  # uncorrelated across steps

    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=3)
    root = eng.add_prompts(["Describe a sunrise."], ids=["x"])[0]
    kids = eng.expand([root], 2048, SamplingParams(temperature=1.0), max_new_tokens=1)[0]
    first = np.array([k.tokens[0] for k in kids])
    prob = {t: float(np.exp(k.logprobs[0])) for t, k in zip(first, kids)}
    ids, counts = np.unique(first, return_counts=True)
    expected = np.array([prob[t] * len(first) for t in ids])
    big = expected >= 10
    chi2 = float(((counts[big] - expected[big]) ** 2 / expected[big]).sum())
    assert big.sum() >= 10 and chi2 < big.sum() + 4 * np.sqrt(2 * big.sum())  # mean dof, sd sqrt(2 dof)


def test_token_budget_splits_programs_without_changing_trees(model_tok):
    """A call over more tokens than `token_budget` runs in several programs (each within the budget); the tree
    is the same, and log-probs equal to float tolerance."""
    model, tok = model_tok
    prompts = ["one two three four five six seven", "four five", "six", "a b c d e f g h i j k l", "x y"]
    params = SamplingParams(temperature=1.0)

    def run(budget):
        eng = TreeEngine(model, tok, seed=2, config=EngineConfig(token_budget=budget))
        roots = eng.add_prompts(prompts, ids=[str(i) for i in range(len(prompts))])
        kids = eng.expand(roots, 3, params, max_new_tokens=6)
        return kids, dict(eng.last_decode_stats)

    big, big_stats = run(0)
    small, small_stats = run(64)
    assert big_stats["programs"] == 1 and small_stats["programs"] >= 3
    for a, b in zip(big, small):
        assert [k.tokens for k in a] == [k.tokens for k in b]
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="token_budget must be >= 0"):
        EngineConfig(token_budget=-1)


def test_group_floor_never_pads_past_the_token_budget(model_tok):
    """min_groups_bucket pads a program's group count only as far as token_budget allows: a floor of 128 groups
    with a budget that holds 4 groups of this cost gives programs of 4 groups (not one item per program, each
    padded to 128)."""
    model, tok = model_tok
    eng = TreeEngine(model, tok, seed=0, config=EngineConfig(min_groups_bucket=128, token_budget=4 * 100))
    tiles = eng._tiles([None] * 10, range(10), [100] * 10)
    assert [g for _, g in tiles] == [4, 4, 2] and sorted(i for ids, _ in tiles for i in ids) == list(range(10))
    roomy = TreeEngine(model, tok, seed=0, config=EngineConfig(min_groups_bucket=8, token_budget=1 << 16))
    assert roomy._tiles([None] * 3, range(3), [100] * 3) == [([0, 1, 2], 8)]  # the floor still applies when it fits


def test_activation_budget_splits_prefill_programs_without_changing_trees(model_tok):
    """Prefill programs stay within `activation_budget_bytes` of attention scores (padded groups count, the
    group floor included): a budget that holds one prompt's scores runs every prompt in its own program; the
    trees are the same."""
    model, tok = model_tok
    prompts = ["one two three four five six seven", "four five", "a b c d e f g h i j k l", "x y"]
    heads = model.config.num_attention_heads

    def run(act):
        eng = TreeEngine(model, tok, seed=2, config=EngineConfig(activation_budget_bytes=act, min_groups_bucket=4))
        before = eng.compilations
        roots = eng.add_prompts(prompts, ids=[str(i) for i in range(len(prompts))])
        kids = eng.expand(roots, 2, SamplingParams(temperature=1.0), max_new_tokens=5)
        return [[k.tokens for k in ks] for ks in kids], eng, eng.compilations - before

    one = 8 * heads * 16 * (16 + 16)  # one group: prefix bucket 16, 16 new tokens (the floors)
    want, _, _ = run(0)
    got, eng, _ = run(one)
    assert got == want
    tiles = eng._tiles([None] * 4, range(4), [32] * 4, [one] * 4)
    assert [g for _, g in tiles] == [1, 1, 1, 1]  # the floor of 4 groups would hold 4x the budget
    assert [g for _, g in eng._tiles([None] * 4, range(4), [32] * 4, [one // 4] * 4)] == [4]
    with pytest.raises(ValueError, match="activation_budget_bytes must be >= 0"):
        EngineConfig(activation_budget_bytes=-1)


def test_half_octave_prefill_buckets_agree_with_powers_of_two(model_tok, run_padded):
    """Prefill lengths padded to 2^k or 3 * 2^(k-1) (the default) give the trees that powers of two give."""
    model, tok = model_tok
    prompts = [list(range(3, 3 + n)) for n in (5, 11, 17, 33, 46)]  # buckets 8, 12, 24, 48, 48 (fine)
    trees = []
    for fine in (True, False):
        eng = TreeEngine(model, tok, seed=1, config=EngineConfig(fine_extend_buckets=fine))
        kids = eng.expand(eng.add_prompts(prompts), 2, SamplingParams(greedy=True), max_new_tokens=6)
        trees.append(kids)
        for node in [k for ks in kids for k in ks]:
            np.testing.assert_allclose(node.logprobs, _logprobs_alone(model, node, run_padded), atol=1e-4)
    assert [[k.tokens for k in ks] for ks in trees[0]] == [[k.tokens for k in ks] for ks in trees[1]]


def test_outer_level_shares_a_prompt_across_groups_exactly(model_tok, run_padded):
    """Multi-level cascade: the drafts of a long prompt, each a group of refinements, read the prompt's full pages
    once as an outer level. Same samples (keys by path) and log-probs as two levels, and as a full forward."""
    model, tok = model_tok
    prompts = [list(range(5, 5 + 110)), list(range(40, 40 + 83)), [7, 8, 9]]  # 6, 5 and 0 full pages of 16

    def run(outer):
        eng = TreeEngine(model, tok, seed=5, config=EngineConfig(outer_level=outer, page_size=16))
        roots = eng.add_prompts(prompts, ids=["a", "b", "c"])
        drafts = eng.expand(roots, 3, SamplingParams(temperature=1.0), max_new_tokens=6)
        asks = eng.append([d for ds in drafts for d in ds], [[3, 4]] * 9)
        kids = eng.expand(asks, 2, SamplingParams(temperature=0.9, top_k=50), max_new_tokens=5)
        return kids, dict(eng.last_decode_stats)

    two, two_stats = run(False)
    three, three_stats = run(True)
    assert two_stats["outer_programs"] == 0 and three_stats["outer_programs"] == 1
    assert 0 < three_stats["outer_kv_bytes"] and three_stats["prefix_kv_bytes"] < two_stats["prefix_kv_bytes"]
    assert [[k.tokens for k in ks] for ks in two] == [[k.tokens for k in ks] for ks in three]
    for a, b in zip(two, three):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
            np.testing.assert_allclose(y.logprobs, _logprobs_alone(model, y, run_padded), atol=1e-4)
    auto, auto_stats = run("auto")  # 110- and 83-token prompts under 8-token suffixes: it pays
    assert auto_stats["outer_programs"] == 1
    assert [[k.tokens for k in ks] for ks in auto] == [[k.tokens for k in ks] for ks in three]


def test_outer_level_config_errors():
    with pytest.raises(ValueError, match="outer_level=true needs group_tile=0"):
        EngineConfig(outer_level=True, group_tile=8)
    with pytest.raises(ValueError, match="outer_level must be"):
        EngineConfig(outer_level="always")
    with pytest.raises(ValueError, match="outer_min_saving"):
        EngineConfig(outer_min_saving=1.0)
    with pytest.raises(ValueError, match="outer_level must be"):
        EngineConfig(outer_level=0)  # not False: 0 would otherwise read as "on without the saving check"
    assert EngineConfig(group_tile=8).outer_level == "auto"  # auto stays off under group_tile


def test_outer_level_splits_groups_that_part_after_a_short_prompt(model_tok, run_padded):
    """A short prompt (2 full pages) under two long drafts, each asked twice: the four groups share only the
    prompt's pages (too few), but each draft's two groups share prompt + draft, which becomes their outer level."""
    from prs_jax.tree.engine import Stop

    model, tok = model_tok

    def run(outer):
        eng = TreeEngine(model, tok, seed=9, config=EngineConfig(outer_level=outer, page_size=16))
        root = eng.add_prompts([list(range(5, 45))], ids=["p"])[0]
        d = eng.expand([root], 2, SamplingParams(temperature=1.0), max_new_tokens=80, stop=Stop(eos_ids=()))[0]
        asks = eng.append([d[0], d[0], d[1], d[1]], [[3, 4], [5, 6], [3, 4], [5, 6]])
        kids = eng.expand(asks, 2, SamplingParams(temperature=0.9), max_new_tokens=5)
        return kids, dict(eng.last_decode_stats)

    two, _ = run(False)
    three, stats = run(True)
    assert stats["outer_programs"] == 1 and stats["outer_kv_bytes"] > 0
    assert [[k.tokens for k in ks] for ks in two] == [[k.tokens for k in ks] for ks in three]
    for a, b in zip(two, three):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
            np.testing.assert_allclose(y.logprobs, _logprobs_alone(model, y, run_padded), atol=1e-4)
