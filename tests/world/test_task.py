"""The synthetic world's task family, gold reward, teacher behaviours and corpora (pure Python, no model)."""

import numpy as np
import pytest

from prs_jax.strategies.vs_parse import parse_verbalized
from prs_jax.world.behaviour import Behaviour, World
from prs_jax.world.corpus import (
    FEEDBACK_TURN,
    REFINE_TURN,
    feedback_text,
    preference_pairs,
    sft_corpus,
    split_prompts,
    world_templates,
)
from prs_jax.world.task import (
    Answer,
    Pref,
    Prompt,
    WorldParseError,
    answer_items,
    gold_reward,
    has_intro,
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
    for _ in range(200):
        p = world.sample_prompt(rng)
        assert parse_prompt(p.x) == (p.category, p.n, p.form)
        assert parse_preference(p.z) == p.prefs
        assert split_query(f"{p.x}\n\n{p.z}") == (p.x, p.z)
    with pytest.raises(WorldParseError, match="not a synthetic-world prompt"):
        parse_prompt("Name four planets.")
    with pytest.raises(WorldParseError, match="preference sentence"):
        parse_preference("Please be funny.")


def test_gold_reward_by_hand():
    x = "Name three fruits."
    z = "Please include mango. Number the items."
    assert gold_reward(x, "1. apple 2. mango 3. pear.", z) == pytest.approx(1.0)
    # valid list, one of two preferences met (mango), not numbered
    assert gold_reward(x, "apple, mango, pear.", z) == pytest.approx(0.4 + 0.6 * 0.5)
    # one item too few (count 0.5), one off-topic item (on-topic 2/3), no repeats; no preference met
    y = "Sure, here they are: apple, hammer."
    assert gold_reward(x, y, z) == pytest.approx(0.4 * (0.5 + 0.5 + 1.0) / 3)
    assert gold_reward(x, "", z) == 0.0
    assert gold_reward(f"{x}\n\n{z}", "1. apple 2. mango 3. pear.") == pytest.approx(1.0)
    assert violations(x, z, y) == ["count", "off:hammer", "include:mango", "numbered"]


def test_preference_checks():
    assert has_intro("Here you go: apple, pear.") and not has_intro("apple, pear.") and not has_intro("1. apple")
    assert is_numbered("1. apple 2. pear.", ["apple", "pear"]) and not is_numbered("apple, pear.", ["apple", "pear"])
    assert satisfied(Pref("sorted"), "apple, pear, plum.") and not satisfied(Pref("sorted"), "pear, apple, plum.")
    assert satisfied(Pref("thanks"), "apple. Thanks for asking!") and not satisfied(Pref("thanks"), "apple.")
    assert satisfied(Pref("exclude", "pear"), "apple, plum.") and not satisfied(Pref("exclude", "pear"), "pear.")
    assert answer_items("1. Apple 2. hammer!") == ["apple", "hammer"]


def test_answer_rendering_parses_back():
    a = Answer(("plum", "apple"), intro=1, numbered=True, thanks=True)
    assert a.text() == "Here you go: 1. plum 2. apple. Thanks for asking!"
    assert answer_items(a.text()) == ["plum", "apple"] and has_intro(a.text()) and is_numbered(a.text(), a.items)


def test_behaviour_rates_order_the_conditions():
    world = World(seed=0)
    rng = np.random.default_rng(1)
    prompts = [world.sample_prompt(rng) for _ in range(300)]
    mean = {c: np.mean([gold_reward(p.x, world.draft(p, c, rng).text(), p.z) for p in prompts])
            for c in ("x", "xz", "pxz")}
    assert mean["x"] + 0.1 < mean["xz"] < mean["pxz"] - 0.05


def test_feedback_and_refinement_behaviour():
    world = World(Behaviour(feedback_recall=1.0, feedback_false_alarm=0.0, fix_named=1.0), seed=0)
    rng = np.random.default_rng(2)
    p = Prompt("fruits", 3, (Pref("include", "mango"), Pref("sorted"), Pref("no_intro")))
    d = Answer(("pear", "apple", "plum"), intro=0)
    named = world.feedback(p, d, rng)
    assert named == violations(p.x, p.z, d.text()) == ["include:mango", "sorted", "no_intro"]
    assert feedback_text(p, named) == "- add mango\n- sort the items from A to Z\n- drop the introduction"
    r = world.refine(p, d, named, rng)
    assert gold_reward(p.x, r.text(), p.z) == 1.0 and "mango" in r.items and list(r.items) == sorted(r.items)


def test_judge_position_bias_when_unsure():
    world = World(seed=0)
    rng = np.random.default_rng(3)
    p = Prompt("fruits", 3, (Pref("numbered"),))
    same = Answer(("apple", "pear", "plum"))
    picks = [world.judge(p, same, same, rng) for _ in range(400)]
    assert 0.7 < np.mean(np.array(picks) == 1) < 0.9  # position 1 about 80% of the time
    good, bad = Answer(("apple", "pear", "plum"), numbered=True), Answer(("apple",))
    assert np.mean([world.judge(p, bad, good, rng) == 2 for _ in range(400)]) > 0.8


def test_corpus_rows_and_pairs():
    world = World(seed=0)
    train, held = split_prompts(world, 50, 10, seed=0)
    assert not {p.id for p in train} & {p.id for p in held}
    rng = np.random.default_rng(4)
    rows = list(sft_corpus(world, train, 300, rng))
    kinds = {r["kind"] for r in rows}
    assert {"answer_x", "reflect", "judge", "verbalized"} <= kinds
    for r in rows:
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][0]["role"] == "user"
        if r["kind"] == "reflect":
            assert r["messages"][2]["content"] == FEEDBACK_TURN and r["messages"][4]["content"] == REFINE_TURN
        if r["kind"] == "verbalized":  # the list parses with the VS parser, probabilities sum to about 1
            items = parse_verbalized(r["messages"][-1]["content"]).items
            assert len(items) >= 1 and sum(i.weight for i in items) == pytest.approx(1.0, abs=0.06)
    pairs = list(preference_pairs(world, train, 50, rng))
    for pr in pairs:
        q = pr["prompt"][0]["content"]
        assert gold_reward(q, pr["chosen"][0]["content"]) > gold_reward(q, pr["rejected"][0]["content"])
    tpl = world_templates()
    assert tpl.feedback_turn == FEEDBACK_TURN and tpl.refine_turn == REFINE_TURN


def test_corpus_is_deterministic():
    def make():
        world = World(seed=5)
        train, _ = split_prompts(world, 30, 5, seed=5)
        return list(sft_corpus(world, train, 50, np.random.default_rng(9)))
    assert make() == make()
