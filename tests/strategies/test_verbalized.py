"""Verbalized sampling: the parser (hand-written outputs and fuzzing), weighting and selection with hand-computed
values, templates, the strategy's logic on a scripted engine, and the real engine path (counts, determinism)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prs_jax.models.tokenizer import load_tokenizer, render_chat
from prs_jax.strategies.base import CallableScorer, PromptItem
from prs_jax.strategies.templates import next_turn_text
from prs_jax.strategies.verbalized import (
    DEFAULT_TEMPLATES, METHODS, VerbalizedSampling, chunk_sizes,
)
from prs_jax.strategies.vs_parse import (
    argmax_index, normalize_weights, parse_verbalized, repair_weight, repair_weights, sample_index,
    split_reasoning, threshold, verbalized_distribution,
)
from prs_jax.tree.tree import Tree


def _pairs(res):
    return [(it.text, it.weight) for it in res.items]


# ----------------------------------------------------------------------------------------------- parser
@pytest.mark.parametrize("text, expected", [
    ('```json\n{"responses": [{"text": "A cat", "probability": 0.5}, {"text": "A dog", "probability": "30%"},]}\n```',
     [("A cat", 0.5), ("A dog", 0.3)]),
    ('Sure! Here you go:\n{"responses": [{"response": "x", "confidence": 0.2}, {"content": "y", "prob": 0.8}]}\nBye',
     [("x", 0.2), ("y", 0.8)]),
    ("{'responses': [{'text': 'it's fine', 'probability': 0.4}, {'text': 'b', 'weight': .6}]}",
     [("it's fine", 0.4), ("b", 0.6)]),
    ('[{"text": "He said "hi" to me", "probability": 0.1}, {"text": "z", "probability": NaN}]',
     [('He said "hi" to me', 0.1), ("z", 0.0)]),
    ('{"Paris": 0.7, "Lyon": "30%"}', [("Paris", 0.7), ("Lyon", 0.3)]),
    ('{"responses": [["a", 0.2], ["b", 0.8]]}', [("a", 0.2), ("b", 0.8)]),
    ('{"responses": [{"text": "a", "probability": 70}, {"text": "b", "probability": 30}]}', [("a", 0.7), ("b", 0.3)]),
    ('{"responses": [{"text": "a" "probability": 0.5}\n{"text": "b", "probability": 1.5}]}', [("a", 0.5), ("b", 1.0)]),
    ('{responses: [{text: plain words here, probability: 0.25}]}', [("plain words here", 0.25)]),
    ('{"data": {"responses": [{"answer": "deep", "likelihood": "0.9"}]}}', [("deep", 0.9)]),
    ('{"text": "just one", "probability": 0.6}', [("just one", 0.6)]),
    ('{"responses": ["x", "y"]}', [("x", 0.0), ("y", 0.0)]),
])
def test_parser_accepts_messy_json(text, expected):
    res = parse_verbalized(text)
    assert res.format == "json"
    assert [t for t, _ in _pairs(res)] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in _pairs(res)], [w for _, w in expected])


def test_parser_recovers_items_before_a_truncation():
    text = ('{"responses": [{"text": "one", "probability": 0.4}, {"text": "two", "probability": 0.3}, '
            '{"text": "thr')
    res = parse_verbalized(text)
    assert _pairs(res) == [("one", 0.4), ("two", 0.3)] and res.truncated
    assert [d.reason for d in res.dropped] == ["truncated"]
    # cut right after a complete item, and inside a number
    assert [t for t, _ in _pairs(parse_verbalized(text[:text.index(', {"text": "two"')]))] == ["one"]
    assert _pairs(parse_verbalized('["alpha", "beta", "gam')) == [("alpha", 0.0), ("beta", 0.0)]


def test_parser_aliases_nll_perplexity_reasoning_and_think_blocks():
    res = parse_verbalized('{"responses": [{"text": "a", "nll": 0.5}, {"text": "b", "perplexity": 4}]}')
    np.testing.assert_allclose(res.weights, [math.exp(-0.5), 0.25])
    res = parse_verbalized('{"reasoning": "weigh the options", "responses": [{"text": "q", "probability": 1}]}')
    assert res.reasoning == "weigh the options" and _pairs(res) == [("q", 1.0)]
    res = parse_verbalized('<think>hmm</think>{"responses": ["x"]}')
    assert res.reasoning == "hmm" and res.texts == ["x"] and not res.has_weights


def test_parser_reports_bad_items_and_limits_counts():
    res = parse_verbalized('{"responses": [{"text": "", "probability": 0.1}, {"probability": 0.2}, 7, '
                           '{"text": "ok", "probability": 0.3}, {"text": "extra", "probability": 0.3}]}', max_items=1)
    assert res.texts == ["ok"]
    reasons = [d.reason for d in res.dropped]
    assert reasons[:3] == ["empty text", "no text field", reasons[2]] and "not a response" in reasons[2]
    assert "beyond the 1 items" in reasons[3]
    res = parse_verbalized("no structure at all [1] {oops")
    assert res.items == [] and res.format == "none" and res.dropped[-1].reason.startswith("no JSON items")


def test_parser_numbered_list_fallback():
    text = ("Here are my answers:\n1. Paris (probability: 0.7)\n2) Lyon (20%)\n3. \"Nice\"\n   a second line\n"
            "- Marseille, p=0.05\n")
    res = parse_verbalized(text)
    assert res.format == "list"
    assert res.texts == ["Paris", "Lyon", '"Nice"\na second line', "Marseille"]
    np.testing.assert_allclose(res.weights, [0.7, 0.2, 0.0, 0.05])
    assert res.items[2].raw_weight is None and res.items[1].raw_weight == "20%"
    assert parse_verbalized(text, allow_list=False).items == []


def test_parser_never_raises_on_odd_inputs():
    for x in [None, 3.5, b"bytes", "[" * 5000, "{" * 5000 + "}", '{"a": ' * 300, "]]]}}}", "\x00\ufffd{", "{'"]:
        res = parse_verbalized(x)
        assert all(0.0 <= it.weight <= 1.0 for it in res.items)


_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_sane(res):
    w = res.weights
    assert w.shape == (len(res.items),) and np.all(np.isfinite(w)) and np.all((w >= 0) & (w <= 1))
    assert all(isinstance(t, str) and t for t in res.texts)
    json.dumps(res.to_dict())


@_settings
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text(text):
    _check_sane(parse_verbalized(text))


_weight = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1000, 1000),
                    st.text(max_size=8), st.none(), st.booleans(),
                    st.integers(0, 100).map(lambda x: f"{x}%"))
_item = st.fixed_dictionaries({"text": st.text(max_size=30)}, optional={"probability": _weight})


@_settings
@given(items=st.lists(_item, max_size=6), cut=st.floats(0, 1), mutation=st.sampled_from(
    ["none", "fence", "prose", "trailing_comma", "single_quotes", "drop_char", "insert_char", "bare_list"]),
    pos=st.integers(0, 10_000), char=st.sampled_from(list('{}[]",:\'%\n\\ x0')))
def test_fuzz_perturbed_json(items, cut, mutation, pos, char):
    text = json.dumps({"responses": items}, allow_nan=True)
    if mutation == "bare_list":
        text = json.dumps(items, allow_nan=True)
    elif mutation == "fence":
        text = f"```json\n{text}\n```"
    elif mutation == "prose":
        text = f"Here you go: {text} -- hope that helps!"
    elif mutation == "trailing_comma":
        text = text.replace("}", ",}").replace("]", ",]")
    elif mutation == "single_quotes":
        text = text.replace('"', "'")
    elif mutation == "drop_char" and text:
        text = text[:pos % len(text)] + text[pos % len(text) + 1:]
    elif mutation == "insert_char":
        text = text[:pos % (len(text) + 1)] + char + text[pos % (len(text) + 1):]
    full = parse_verbalized(text)
    _check_sane(full)
    # the naive trailing-comma mutation also edits brackets inside the texts: only then is content changed
    edits_content = mutation == "trailing_comma" and any(c in it["text"] for it in items for c in "}]")
    if mutation in ("none", "fence", "prose", "trailing_comma", "bare_list") and not edits_content:
        kept = [it["text"].strip() for it in items if it["text"].strip()]
        assert full.texts == kept  # a valid (or cleanly wrapped) JSON payload loses nothing
    truncated = parse_verbalized(text[:int(cut * len(text))])
    _check_sane(truncated)


def test_split_reasoning():
    assert split_reasoning("step one\nstep two\nFinal response: Paris.") == ("step one\nstep two", "Paris.")
    assert split_reasoning("thinking...\nAnswer: 42") == ("thinking...", "42")
    assert split_reasoning("no marker here") == ("", "no marker here")
    assert split_reasoning("a ==> b", marker="==>") == ("a", "b")


# ----------------------------------------------------------------------------------------------- weights
def test_repair_weights():
    assert [repair_weight(x) for x in ["70%", "0.3", " 45 % ", "1/4", "~0.2", 0.5, 2, -1, "high", None, True,
                                       float("nan"), float("inf"), "1e999"]] == [
        0.7, 0.3, 0.45, 0.25, 0.2, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(repair_weights([70, 20, "10%"]), [0.7, 0.2, 0.1])  # auto: numbers read as percent
    np.testing.assert_allclose(repair_weights([70, 20, "10%"], percent_scale=False), [1.0, 1.0, 0.1])
    np.testing.assert_allclose(repair_weights([0.7, 150]), [0.7, 1.0])  # 150 > 100: not a percent scale
    np.testing.assert_allclose(repair_weights([0.5, 1.5]), [0.5, 1.0])  # sums to 2: sloppy probabilities
    np.testing.assert_allclose(repair_weights([0.5, 0.25], percent_scale=True), [0.005, 0.0025])


def test_threshold_and_min_survivors():
    w = [0.5, 0.05, 0.3, 0.1, 0.05]
    assert threshold(w, 0.1, 3).tolist() == [0, 2, 3]  # three survive on their own
    assert threshold(w, 0.2, 3).tolist() == [0, 2, 3]  # two survive: keep the top three
    assert threshold(w, 0.4, 2).tolist() == [0, 2]
    assert threshold(w, 0.6, 4).tolist() == [0, 1, 2, 3]  # ties at the cut: the earlier one (index 1)
    assert threshold(w, 0.6, 0).tolist() == []
    assert threshold([0.1, 0.2], 0.9, 3).tolist() == [0, 1]


def test_weight_modes_by_hand():
    w = np.array([0.5, 0.3, 0.2, 0.0])
    np.testing.assert_allclose(normalize_weights(w, "elicited"), [0.5, 0.3, 0.2, 0.0])
    np.testing.assert_allclose(normalize_weights([0.2, 0.2], "elicited"), [0.5, 0.5])
    np.testing.assert_allclose(normalize_weights([0.0, 0.0], "elicited"), [0.5, 0.5])  # no mass: uniform
    e = np.exp([0.5, 0.3, 0.2, 0.0])
    np.testing.assert_allclose(normalize_weights(w, "softmax"), e / e.sum())
    np.testing.assert_allclose(normalize_weights(w, "uniform"), [0.25] * 4)
    with pytest.raises(ValueError, match="mode"):
        normalize_weights(w, "bogus")


def test_distribution_sorting_sampling_and_argmax():
    d = verbalized_distribution([0.1, 0.6, 0.05, 0.3], tau=0.1, min_survivors=2)
    assert d.indices.tolist() == [1, 3, 0] and d.filtered.tolist() == [2]
    np.testing.assert_allclose(d.probs, [0.6, 0.3, 0.1])
    assert argmax_index(d) == 1
    u = verbalized_distribution([0.1, 0.6, 0.05, 0.3], mode="uniform")
    assert u.indices.tolist() == [1, 3, 0, 2]  # uniform ties broken by the written weight
    draws = [sample_index(d, np.random.default_rng(s)) for s in range(2000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.0, 0.3], atol=0.04)
    assert sample_index(d, 7) == sample_index(d, np.random.default_rng(7))
    with pytest.raises(ValueError, match="empty"):
        argmax_index(verbalized_distribution([]))


# ----------------------------------------------------------------------------------------------- templates
def test_templates_bound_and_overrides(tmp_path):
    vs = VerbalizedSampling(k=4, probability_upper_bound=0.1)
    text = vs.render("vs_standard", "Tell a joke.")
    assert text.startswith("Tell a joke.") and "4 distinct" in text and "below 0.1." in text
    assert "{" in text and "{upper_bound}" not in text and "{k}" not in text
    assert "below" not in VerbalizedSampling(k=4).render("vs_standard", "x")
    assert "below" not in vs.render("sequence", "x")  # no probabilities, no bound
    f = tmp_path / "t.txt"
    f.write_text("Q: {prompt} / {k}")
    vs2 = VerbalizedSampling(k=3, probability_upper_bound=0.5, templates={"vs_standard": "@" + str(f)})
    assert vs2.render("vs_standard", "hi") == "Q: hi / 3" + DEFAULT_TEMPLATES["upper_bound"].replace("{bound}", "0.5")
    with pytest.raises(ValueError, match="unknown template"):
        VerbalizedSampling(templates={"nope": "x"})
    with pytest.raises(ValueError, match="method"):
        VerbalizedSampling(method="vs_magic")
    with pytest.raises(ValueError, match="upper_bound"):
        VerbalizedSampling(probability_upper_bound=0.0)
    assert chunk_sizes(7, 3) == [3, 3, 1] and chunk_sizes(2, 5) == [2] and chunk_sizes(6, 3) == [3, 3]


def test_turn_suffix_matches_full_rendering(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    history = [{"role": "user", "content": "Name a fruit."}]
    first = render_chat(tok, history)
    answer = "Apple."
    suffix = next_turn_text(tok, "Another one?")
    full = render_chat(tok, history + [{"role": "assistant", "content": answer},
                                       {"role": "user", "content": "Another one?"}])
    assert first + answer + suffix == full  # generation cut by length: the suffix closes the turn itself
    eos_node = SimpleNamespace(finish_reason="eos", tokens=[tok.eos_token_id])
    assert first + answer + tok.eos_token + next_turn_text(tok, "Another one?", eos_node) == full
    assert next_turn_text(None, "more") == "\n\nUser: more\n\nAssistant: "


# ----------------------------------------------------------------------------------------------- scripted engine
class ScriptedEngine:
    """The engine's interface with canned generations: `reply(context_text, child_index)` gives each child's text."""

    def __init__(self, tokenizer, reply, window=4096):
        self.tokenizer = tokenizer
        self.tree = Tree()
        self.cfg = SimpleNamespace(max_position_embeddings=window)
        self.reply = reply
        self.calls = []

    def encode(self, item, special_tokens=True):
        if isinstance(item, str):
            return list(self.tokenizer(item, add_special_tokens=special_tokens)["input_ids"])
        text = render_chat(self.tokenizer, list(item))
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def add_prompts(self, prompts, metadata=None, ids=None):
        self.calls.append(("add_prompts", len(prompts)))
        return [self.tree.add("prompt", self.encode(p), None, text=p if isinstance(p, str) else render_chat(
            self.tokenizer, p), metadata=dict(metadata[i]) if metadata else {}) for i, p in enumerate(prompts)]

    def append(self, parents, texts, metadata=None):
        self.calls.append(("append", len(parents)))
        return [self.tree.add("fixed", self.encode(t, special_tokens=False), p, text=t,
                              metadata=dict(metadata[i]) if metadata else {})
                for i, (p, t) in enumerate(zip(parents, texts))]

    def expand(self, parents, n, sampling, *, max_new_tokens, stop=None):
        self.calls.append(("expand", len(parents), n))
        out = []
        for p in parents:
            ctx = "".join(x.text for x in p.path())
            out.append([self.tree.add("generated", self.encode(t, special_tokens=False) + [self.tokenizer.eos_token_id],
                                      p, text=t, finish_reason="eos")
                        for t in (self.reply(ctx, c) for c in range(n))])
        return out


def _vs_reply(ctx, c):
    return json.dumps({"responses": [{"text": f"r{c}-{i}", "probability": p}
                                     for i, p in enumerate([0.6, 0.3, 0.1])]})


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_vs_standard_budget_candidates_and_selection(tok):
    eng = ScriptedEngine(tok, _vs_reply)
    items = [PromptItem("p0", "Tell a joke."), PromptItem("p1", "Name a colour.")]
    scorer = CallableScorer(lambda p, r, z: float(r == "r1-2"))  # the least probable item of call 1
    vs = VerbalizedSampling(method="vs_standard", k=3, n=7, max_new_tokens=32)
    res = vs.run(items, eng, scorer)
    # n=7, k=3 -> two calls asking for 3 (siblings of one root) and one asking for 1 (its own root)
    assert ("expand", 2, 2) in eng.calls and ("expand", 2, 1) in eng.calls
    r = res[0]
    assert r.info["calls"] == 3 and len(r.extra_roots) == 1 and "1 distinct" in r.extra_roots[0].text
    assert [c.text for c in r.candidates] == ["r0-0", "r0-1", "r0-2", "r1-0", "r1-1", "r1-2", "r0-0"]
    c = r.candidates[5]
    assert c.id == c.parent.id and c.parent.kind == "generated" and c not in c.parent.children and c.tokens == []
    assert c.metadata["weight"] == pytest.approx(0.1) and c.metadata["call"] == 1
    np.testing.assert_allclose(sum(x.metadata["probability"] for x in r.candidates), 1.0)
    assert r.selected.text == "r1-2" and r.reward == 1.0 and r.info["selected_by"] == "reward"
    assert r.info["parses"][2]["dropped"][0]["reason"].startswith("beyond the 1 items")
    json.dumps(r.to_row(with_tree=False))
    # tau filters the 0.1 items: reward selection only among survivors (ties: the more probable)
    r = VerbalizedSampling(method="vs_standard", k=3, n=3, tau=0.2, min_survivors=1).run(items, eng, scorer)[0]
    assert r.info["distribution"]["filtered"] == [2] and r.candidates[2].metadata["probability"] is None
    assert r.selected.text == "r0-0"
    # no scorer: argmax of the verbalised distribution; "sample" is reproducible per prompt id
    r = VerbalizedSampling(method="vs_standard", k=3, n=3).run(items, eng, None)[0]
    assert r.selected.text == "r0-0" and r.info["selected_by"] == "probability" and math.isnan(r.reward)
    picks = {VerbalizedSampling(k=3, n=3, select="sample", seed=s).run(items[:1], eng, None)[0].selected.text
             for s in range(20)}
    assert picks <= {"r0-0", "r0-1", "r0-2"} and len(picks) >= 2
    again = [VerbalizedSampling(k=3, n=3, select="sample", seed=3).run(items[:1], eng, None)[0].selected.text
             for _ in range(2)]
    assert again[0] == again[1]


def test_direct_cot_sequence_and_unparsable_output(tok):
    eng = ScriptedEngine(tok, lambda ctx, c: f"thinking {c}\nFinal response: answer {c}" if "step by step" in ctx
                         else ("1. alpha\n2. beta" if "different responses" in ctx else f"plain {c}"))
    items = [PromptItem("a", "Q?")]
    r = VerbalizedSampling(method="direct", n=3).run(items, eng, CallableScorer(lambda p, x, z: -len(x)))[0]
    assert [c.text for c in r.candidates] == ["plain 0", "plain 1", "plain 2"]
    assert all(c in c.parent.children for c in r.candidates)  # direct: the generated nodes themselves
    assert r.info["weight_mode"] == "uniform" and r.selected.text == "plain 0"
    r = VerbalizedSampling(method="cot", n=2).run(items, eng, None)[0]
    assert [c.text for c in r.candidates] == ["answer 0", "answer 1"]
    assert r.candidates[1].metadata["reasoning"] == "thinking 1"
    r = VerbalizedSampling(method="sequence", k=2, n=4).run(items, eng, None)[0]
    assert [c.text for c in r.candidates] == ["alpha", "beta", "alpha", "beta"]
    assert r.info["parses"][0]["format"] == "list"
    gib = ScriptedEngine(tok, lambda ctx, c: f"zz{c} qq")
    r = VerbalizedSampling(method="vs_cot", k=5, n=10).run(items, gib, None)[0]
    assert [c.text for c in r.candidates] == ["zz0 qq", "zz1 qq"]  # raw generations as a fallback
    assert not r.candidates[0].metadata["parsed"] and r.info["parses"][0]["n_items"] == 0


def test_multi_turn_chains_turns_on_generated_nodes(tok):
    eng = ScriptedEngine(tok, lambda ctx, c: f"reply {ctx.count('<|assistant|>')}")
    items = [PromptItem("a", "Name a fruit."), PromptItem("b", "Name a colour.")]
    r = VerbalizedSampling(method="multi_turn", n=3).run(items, eng, None)[0]
    assert [c.text for c in r.candidates] == ["reply 1", "reply 2", "reply 3"]
    assert [len(layer) for layer in r.layers] == [1, 1, 1]
    assert [c for c in eng.calls if c[0] == "expand"] == [("expand", 2, 1)] * 3
    last = r.candidates[-1]
    req = last.parent
    assert req.kind == "fixed" and req.parent is r.candidates[1] and r.candidates[1].parent.parent is r.candidates[0]
    # the whole path is exactly the chat template's rendering of the conversation
    ctx = tok.decode(last.parent.context_tokens(), skip_special_tokens=False)
    nxt = DEFAULT_TEMPLATES["multi_turn_next"]
    convo = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "reply 1"},
             {"role": "user", "content": nxt}, {"role": "assistant", "content": "reply 2"},
             {"role": "user", "content": nxt}]
    assert ctx == render_chat(tok, convo)


def test_vs_multi_turns_and_window_stop(tok):
    eng = ScriptedEngine(tok, _vs_reply)
    items = [PromptItem("a", "Tell a joke.")]
    r = VerbalizedSampling(method="vs_multi", k=3, n=7, probability_upper_bound=0.2).run(items, eng, None)[0]
    assert [len(layer) for layer in r.layers] == [3, 3, 1] and r.info["calls"] == 3
    asks = [n for n in eng.tree if n.kind == "fixed"]
    assert len(asks) == 2 and "3 more" in asks[0].text and "1 more" in asks[1].text and "below 0.2" in asks[1].text
    vs = VerbalizedSampling(method="vs_multi", k=3, n=9, max_new_tokens=60)
    first_len = len(eng.encode([{"role": "user", "content": vs.render("vs_multi", "Tell a joke.", 3)}]))
    small = ScriptedEngine(tok, _vs_reply, window=first_len + 80)  # room for turn 0, not for turn 1
    r = vs.run(items, small, None)[0]
    assert r.info["calls"] == 1 and "turn 1" in r.info["stopped"] and "window" in r.info["stopped"]


# ----------------------------------------------------------------------------------------------- real engine
def test_real_engine_counts_and_determinism(llama_dir):
    from prs_jax.models import load_causal_lm
    from prs_jax.tree.engine import EngineConfig, TreeEngine

    model, tokenizer = load_causal_lm(llama_dir), load_tokenizer(llama_dir)
    # one prefix / group / prompt bucket for everything, so the run compiles few programs (expand n=1 and n=2)
    cfg = EngineConfig(min_prefix_bucket=128, min_groups_bucket=2, min_extend_bucket=64)
    short = {"cot": "{prompt} reason", "sequence": "{prompt} list {k}", "multi_turn_next": "more",
             "vs_standard": "{prompt} vs {k}{upper_bound}", "vs_cot": "{prompt} vscot {k}", "vs_multi": "{prompt} {k}",
             "vs_multi_next": "{k} more", "upper_bound": " <{bound}"}
    items = [PromptItem("a", "Name a fruit."), PromptItem("b", "What is red?")]
    scorer = CallableScorer(lambda p, r, z: float(len(r)))
    plan = {"direct": 2, "cot": 2, "sequence": 3, "vs_standard": 3, "vs_cot": 3, "multi_turn": 2, "vs_multi": 3}

    def run_all(engine):
        out = {}
        for method in METHODS:
            vs = VerbalizedSampling(method=method, k=2, n=plan[method], max_new_tokens=6, templates=short,
                                    probability_upper_bound=0.3)
            out[method] = vs.run(items, engine, scorer)
        return out

    eng = TreeEngine(model, tokenizer, seed=0, config=cfg)
    first = run_all(eng)
    calls = {"direct": 2, "cot": 2, "sequence": 2, "vs_standard": 2, "vs_cot": 2, "multi_turn": 2, "vs_multi": 2}
    for method, results in first.items():
        assert len(results) == 2
        for r in results:
            assert r.info["calls"] == calls[method] and r.candidates and r.selected in r.candidates
            assert r.reward == max(c.reward for c in r.candidates)
            json.dumps(r.to_row(with_tree=True))
    assert "<0.3" in first["vs_standard"][0].root.text
    assert len(first["sequence"][0].extra_roots) == 1  # n=3, k=2: a second prompt asking for 1
    mt = first["multi_turn"][0]
    req = mt.candidates[1].parent
    assert req.kind == "fixed" and req.parent is mt.candidates[0]
    assert req.text.startswith("<|end|>") == (mt.candidates[0].finish_reason != "eos")
    assert eng.compilations <= 4
    # same seed, fresh engine (compiled programs are shared across engines): the same trees and selections
    eng2 = TreeEngine(model, tokenizer, seed=0, config=cfg)
    second = run_all(eng2)
    assert eng2.compilations == 0
    for method in METHODS:
        for a, b in zip(first[method], second[method]):
            assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
            assert a.selected.text == b.selected.text
