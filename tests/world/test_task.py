"""The synthetic world (v2): task family, gold reward, teacher programs, corpora (pure Python, no model)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prs_jax.strategies.vs_parse import parse_verbalized
from prs_jax.world.behaviour import Behaviour, World
from prs_jax.world.corpus import (
    FEEDBACK_TURN,
    REFINE_TURN,
    curriculum_prompts,
    feedback_text,
    minimal_pair,
    parse_feedback,
    preference_pairs,
    sft_corpus,
    split_prompts,
    world_templates,
)
from prs_jax.world.task import (
    KINDS,
    Answer,
    Pref,
    Prompt,
    WorldParseError,
    answer_items,
    gold_reward,
    has_intro,
    is_capitalised,
    is_numbered,
    parse_preference,
    parse_prompt,
    satisfied,
    split_query,
    violations,
)


def test_prompt_and_preference_round_trip():
    world = World(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(300):
        p = world.sample_prompt(rng)
        assert len(p.prefs) == 3 and len({q.kind for q in p.prefs}) == 3
        named = [q.item for q in p.prefs if q.item]
        assert len(named) == len(set(named))  # preferences never name the same item twice
        assert parse_prompt(p.x) == (p.category, p.n, p.form)
        assert parse_preference(p.z) == p.prefs
        assert split_query(f"{p.x}\n\n{p.z}") == (p.x, p.z)
    s = world.sample_single(rng)
    assert parse_prompt(s.x) == (s.category, 1, s.form)
    assert "sorted" not in KINDS
    with pytest.raises(WorldParseError, match="not a synthetic-world prompt"):
        parse_prompt("Name four planets.")
    with pytest.raises(WorldParseError, match="preference sentence"):
        parse_preference("Please be funny.")


def test_gold_reward_by_hand():
    x = "Name three fruits."
    z = "Please include mango. Number the items. Put pear first."
    assert gold_reward(x, "1. pear 2. mango 3. apple.", z) == pytest.approx(1.0)
    # valid list, one of three preferences met (mango)
    assert gold_reward(x, "apple, mango, pear.", z) == pytest.approx(0.4 + 0.6 / 3)
    # one item too few (count 0.5), one off-topic item (on-topic 1/2), no repeats; no preference met
    y = "Sure, here they are: apple, hammer."
    assert gold_reward(x, y, z) == pytest.approx(0.4 * (0.5 + 0.5 + 1.0) / 3)
    assert gold_reward(x, "", z) == 0.0
    assert gold_reward(f"{x}\n\n{z}", "1. pear 2. mango 3. apple.") == pytest.approx(1.0)
    assert violations(x, z, y) == ["count", "off:hammer", "include:mango", "numbered", "first:pear"]


def test_preference_checks():
    assert has_intro("Here you go: apple, pear.") and not has_intro("apple, pear.") and not has_intro("1. apple")
    assert not has_intro("Apple, Pear.") and not has_intro("1. Apple")
    assert is_numbered("1. apple 2. pear.", ["apple", "pear"]) and not is_numbered("apple, pear.", ["apple", "pear"])
    assert is_capitalised("Apple, Pear.") and not is_capitalised("Apple, pear.") and not is_capitalised("Sure.")
    assert satisfied(Pref("first", "pear"), "Pear, apple.") and not satisfied(Pref("first", "pear"), "apple, pear.")
    assert satisfied(Pref("last", "pear"), "apple, pear.") and not satisfied(Pref("last", "pear"), "pear, apple.")
    assert satisfied(Pref("thanks"), "apple. Thanks for asking!") and not satisfied(Pref("thanks"), "apple.")
    assert satisfied(Pref("exclude", "pear"), "apple, plum.") and not satisfied(Pref("exclude", "pear"), "pear.")
    assert answer_items("1. Apple 2. hammer!") == ["apple", "hammer"]


def test_answer_rendering_parses_back():
    a = Answer(("plum", "apple"), intro=1, numbered=True, thanks=True, capitalised=True)
    assert a.text() == "Here you go: 1. Plum 2. Apple. Thanks for asking!"
    assert answer_items(a.text()) == ["plum", "apple"] and has_intro(a.text()) and is_numbered(a.text(), a.items)
    assert is_capitalised(a.text())


def test_conditions_order_and_rare_preferences():
    world = World(seed=0)
    rng = np.random.default_rng(1)
    prompts = [world.sample_prompt(rng) for _ in range(400)]
    met = {c: np.mean([[satisfied(q, world.draft(p, c, rng).text()) for q in p.prefs] for p in prompts])
           for c in ("x", "xz", "pxz")}
    assert met["x"] < 0.3 and met["x"] + 0.1 < met["xz"] < met["pxz"] - 0.15 and met["xz"] < 0.55
    all3 = np.mean([all(satisfied(q, world.draft(p, "xz", rng).text()) for q in p.prefs) for p in prompts])
    assert all3 < 0.15  # few drafts satisfy all three preferences: refining beats resampling


def test_critique_is_exact_and_refinement_fixes_what_is_named():
    world = World(Behaviour(fix_named=1.0, fix_unnamed=0.0), seed=0)
    rng = np.random.default_rng(2)
    p = Prompt("fruits", 3, (Pref("include", "mango"), Pref("last", "plum"), Pref("no_intro")))
    d = Answer(("plum", "apple", "pear"), intro=0)
    named = world.feedback(p, d)
    assert named == violations(p.x, p.z, d.text()) == ["include:mango", "last:plum", "no_intro"]
    text = feedback_text(p, named)
    assert text == "- add mango\n- end the list with plum\n- drop the introduction"
    assert parse_feedback(text) == (named, 0) and parse_feedback("- nothing to change") == ([], 0)
    assert parse_feedback("- add mango\nblah") == (["include:mango"], 1)
    r = world.refine(p, d, named, rng)
    assert gold_reward(p.x, r.text(), p.z) == 1.0
    # only what is named gets fixed (no unnamed fixes at fix_unnamed=0)
    r1 = world.refine(p, d, ["no_intro"], rng)
    assert violations(p.x, p.z, r1.text()) == ["include:mango", "last:plum"]


def test_apply_fixes_regression_missing_repeat_item():
    """v1 read idx[-1] before checking idx was non-empty: an IndexError when the named repeat was gone."""
    world = World(seed=0)
    rng = np.random.default_rng(0)
    p = Prompt("fruits", 3, (Pref("numbered"),))
    a = Answer(("apple", "pear", "plum"))
    for issue in ("repeat:mango", "off:hammer", "repeat:apple", "exclude:kiwi"):
        out = world.apply_fixes(p, a, [issue], rng)
        assert out.items == a.items


def test_first_and_last_fixed_together():
    world = World(seed=0)
    rng = np.random.default_rng(5)
    p = Prompt("fruits", 4, (Pref("first", "plum"), Pref("last", "mango"), Pref("exclude", "apple")))
    for items in (("mango", "apple", "pear", "plum"), ("apple", "pear"), ("pear", "lemon", "grape", "melon", "lime")):
        a = Answer(tuple(i for i in items if i != "lime"))
        fixed = world.apply_fixes(p, a, violations(p.x, p.z, a.text()), rng)
        assert violations(p.x, p.z, fixed.text()) == [], (items, fixed)


def test_judge_fewer_violations_ties_dropped_bias_only_without_cot():
    world = World(Behaviour(judge_position_bias=0.3), seed=0)
    rng = np.random.default_rng(3)
    p = Prompt("fruits", 3, (Pref("numbered"), Pref("thanks"), Pref("include", "mango")))
    same = Answer(("apple", "pear", "plum"))
    assert world.judge(p, same, same, rng) is None
    good, bad = Answer(("apple", "mango", "plum"), numbered=True), Answer(("apple",))
    assert all(world.judge(p, bad, good, rng, cot=True) == 2 for _ in range(100))
    biased = np.mean([world.judge(p, bad, good, rng) == 1 for _ in range(2000)])
    assert 0.25 < biased < 0.35


def test_verbalized_known_base_distribution():
    world = World(seed=0)
    rng = np.random.default_rng(6)
    base = world.p_base("fruits")
    assert sum(base.values()) == pytest.approx(1.0) and len(base) == 10
    s = Prompt("fruits", 1, (), 0)
    counts = {}
    for _ in range(4000):
        (item,) = world.draft(s, "x", rng).items
        counts[item] = counts.get(item, 0) + 1
    emp = np.array([counts.get(i, 0) / 4000 for i in base])
    assert np.abs(emp - np.array(list(base.values()))).max() < 0.03
    lst = world.verbalized(s, 4, rng)
    items = [a.items[0] for a, _ in lst]
    assert len(set(items)) == 4 and sum(w for _, w in lst) == pytest.approx(1.0)
    z = sum(base[i] for i in items)
    for (a, w), i in zip(lst, items):
        assert w == pytest.approx(base[i] / z, abs=0.011)


def test_corpus_rows_and_pairs():
    world = World(seed=0)
    train, held = split_prompts(world, 50, 10, seed=0)
    assert not {p.id for p in train} & {p.id for p in held}
    assert all(len(p.prefs) == 1 for p in curriculum_prompts(world, 20, 0, set()))
    rng = np.random.default_rng(4)
    rows = list(sft_corpus(world, train, 400, rng))
    kinds = {r["kind"] for r in rows}
    assert {"answer_x", "reflect", "critique", "critique_given", "critique_drill", "judge", "judge_cot",
            "vs_list"} <= kinds
    for r in rows:
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][0]["role"] == "user"
        if r["kind"] == "reflect":
            assert r["messages"][2]["content"] == FEEDBACK_TURN and r["messages"][4]["content"] == REFINE_TURN
        if r["kind"] == "verbalized":  # the list parses with the VS parser, probabilities sum to 1
            items = parse_verbalized(r["messages"][-1]["content"]).items
            assert len(items) >= 1 and sum(i.weight for i in items) == pytest.approx(1.0, abs=0.02)
    pairs = list(preference_pairs(world, train, 80, rng))
    assert {p["source"] for p in pairs} == {"minimal", "teacher"}
    for pr in pairs:
        q = pr["prompt"][0]["content"]
        assert gold_reward(q, pr["chosen"][0]["content"]) > gold_reward(q, pr["rejected"][0]["content"])
    mp = next(r for r in (minimal_pair(world, train[0], np.random.default_rng(i)) for i in range(20)) if r)
    diff = set(violations(train[0].x, train[0].z, mp["rejected"][0]["content"])) - set(
        violations(train[0].x, train[0].z, mp["chosen"][0]["content"]))
    assert len(diff) >= 1
    tpl = world_templates()
    assert tpl.feedback_turn == FEEDBACK_TURN and tpl.refine_turn == REFINE_TURN


def test_corpus_is_deterministic():
    def make():
        world = World(seed=5)
        train, _ = split_prompts(world, 30, 5, seed=5)
        return list(sft_corpus(world, train, 50, np.random.default_rng(9)))
    assert make() == make()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), draw=st.integers(0, 2**31 - 1))
def test_generator_fuzz(seed, draw):
    """Over many world seeds: no exception anywhere in the teacher programs, every answer scored in [0, 1]."""
    world = World(seed=seed)
    rng = np.random.default_rng(draw)
    for _ in range(6):
        p = world.sample_prompt(rng, n_prefs=int(rng.integers(1, 4)))
        for cond in ("x", "xz", "pxz"):
            d = world.draft(p, cond, rng)
            r = world.refine(p, d, world.feedback(p, d), rng)
            r0 = world.refine(p, d, None, rng)
            for a in (d, r, r0):
                g = gold_reward(p.x, a.text(), p.z)
                assert 0.0 <= g <= 1.0
            assert parse_feedback(feedback_text(p, world.feedback(p, d))) == (violations(p.x, p.z, d.text()), 0)
        world.judge(p, d, r, rng)
        world.verbalized(p, 3, rng)
        for kind in ("critique", "reflect", "judge", "judge_cot", "verbalized_more", "multi_turn"):
            from prs_jax.world.corpus import conversation

            conversation(world, kind, p, rng)


def test_study_kind_list_matches_the_world():
    from prs_jax.experiments.preference_adaptation import WORLD_KINDS

    assert set(WORLD_KINDS) == set(KINDS)


def test_critique_drills_are_error_rich_and_critiqued_by_the_teacher():
    """Drill answers carry the rare violations (count, off-topic, repeats) far more often than ordinary drafts,
    meet each preference about half the time, and their target is still the teacher's exact critique."""
    from prs_jax.world.behaviour import drill_rates
    from prs_jax.world.corpus import conversation, parse_feedback

    world = World(seed=3)
    rng = np.random.default_rng(0)
    prompts = [world.sample_prompt(rng) for _ in range(300)]

    def share(rates, kind):
        r = np.random.default_rng(1)
        hits = [any(v.split(":")[0] == kind for v in violations(p.x, p.z, world.draft(p, "xz", r, rates).text()))
                for p in prompts]
        return float(np.mean(hits))

    assert share(drill_rates(world.b), "repeat") > 3 * share(None, "repeat")
    assert share(drill_rates(world.b), "off") > 1.5 * share(None, "off")
    r = np.random.default_rng(2)
    for p in prompts[:40]:
        row = conversation(world, "critique_drill", p, r)
        quoted = row["messages"][0]["content"].split("\nAnswer: ")[1].split("\nWhat should change")[0]
        assert parse_feedback(row["messages"][-1]["content"]) == (violations(p.x, p.z, quoted), 0)
