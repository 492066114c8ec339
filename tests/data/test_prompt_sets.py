"""Prompt-set loaders on hand-written fixture files in each set's real format (all rows invented)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from prs_jax.data.io import write_jsonl
from prs_jax.data.prompt_sets import (
    HH_ASSISTANT_TAG, PROMPT_SETS, load_alpaca_eval, load_generic, load_hh, load_mt_bench, load_prompt_set, load_tldr,
    load_ultrafeedback, parse_hh_dialogue, prompt_set_names, register_prompt_set, tldr_prompt,
)
from prs_jax.errors import DataError
from prs_jax.strategies.base import PromptItem

FIX = Path(__file__).parent / "fixtures" / "prompt_sets"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def ids(items: list[PromptItem]) -> list[str]:
    return [it.id for it in items]


# ------------------------------------------------------------------------------------------------ AlpacaEval

def test_alpaca_eval_json_list_ids_from_index():
    items = load_alpaca_eval(FIX / "alpaca_eval.json")
    assert ids(items) == ["alpaca_eval-0", "alpaca_eval-1", "alpaca_eval-2"]
    assert items[0].prompt == "Suggest three names for a bakery that only sells rye bread."
    assert items[0].preference is None
    meta = items[1].metadata
    assert meta["dataset"] == "selfinstruct" and meta["generator"] == "invented_reference"
    assert meta["output"].startswith("Near the horizon") and meta["index"] == 1
    assert meta["prompt_set"] == "alpaca_eval" and meta["where"].endswith("alpaca_eval.json [1]")


def test_alpaca_eval_hash_ids_survive_reordering():
    rows = json.loads((FIX / "alpaca_eval.json").read_text())
    forward = load_alpaca_eval(FIX / "alpaca_eval.json", id_from="hash")
    backward = load_alpaca_eval(rows[::-1], id_from="hash")
    assert forward[0].id == "alpaca_eval-" + sha(rows[0]["instruction"])[:12]
    assert {it.id: it.prompt for it in forward} == {it.id: it.prompt for it in backward}


def test_alpaca_eval_jsonl_outputs_and_plain_instruction_lists():
    outs = load_alpaca_eval(FIX / "alpaca_eval_outputs.jsonl")
    assert [it.metadata["generator"] for it in outs] == ["my_model", "my_model"]
    assert outs[1].metadata["where"].endswith("alpaca_eval_outputs.jsonl:2")
    plain = load_alpaca_eval(FIX / "alpaca_eval_instructions.json")
    assert [it.prompt for it in plain] == ["List four uses for an empty glass jar.",
                                           "What is the difference between a lake and a pond?"]
    assert ids(plain) == ["alpaca_eval-0", "alpaca_eval-1"]
    assert plain[1].metadata["where"].endswith("alpaca_eval_instructions.json [1]")
    in_memory = load_alpaca_eval(["Say hi.", {"instruction": "Say bye.", "input": "in French"}])
    assert [it.prompt for it in in_memory] == ["Say hi.", "Say bye.\n\nin French"]


def test_alpaca_eval_errors_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "outputs.jsonl", [{"instruction": "ok"}, {"output": "no instruction"}])
    with pytest.raises(DataError, match=r"outputs\.jsonl:2: missing column 'instruction'"):
        load_alpaca_eval(path)
    with pytest.raises(DataError, match=r"row 1: expected a JSON object or a string"):
        load_alpaca_eval(["fine", 3])
    with pytest.raises(ValueError, match="id_from"):
        load_alpaca_eval(FIX / "alpaca_eval.json", id_from="row")


# -------------------------------------------------------------------------------------------------- MT-Bench

def test_mt_bench_first_turn():
    items = load_mt_bench(FIX / "mt_bench_question.jsonl")
    assert ids(items) == ["mt_bench-501", "mt_bench-502", "mt_bench-503"]
    assert items[0].prompt == "Write a short welcome note for new members of a community garden."
    assert items[0].metadata["turns"] == [items[0].prompt]
    assert items[0].metadata["category"] == "writing" and items[0].metadata["question_id"] == 501
    assert items[1].metadata["reference"] == ["15 minutes"]
    assert "reference" not in items[0].metadata
    assert items[2].metadata["where"].endswith("mt_bench_question.jsonl:3")


def test_mt_bench_both_turns_keep_the_second_in_metadata():
    items = load_mt_bench(FIX / "mt_bench_question.jsonl", turns="both")
    first = load_mt_bench(FIX / "mt_bench_question.jsonl", turns="first")
    assert ids(items) == ids(first) and [it.prompt for it in items] == [it.prompt for it in first]
    assert items[0].metadata["turns"] == ["Write a short welcome note for new members of a community garden.",
                                          "Now rewrite the note as a limerick."]
    assert items[1].metadata["reference"] == ["15 minutes", "24 minutes"]


def test_mt_bench_errors(tmp_path):
    one = {"question_id": 1, "category": "x", "turns": ["only one"]}
    path = write_jsonl(tmp_path / "question.jsonl", [{"question_id": 0, "turns": ["a", "b"]}, one])
    assert len(load_mt_bench(path)) == 2
    with pytest.raises(DataError, match=r"question\.jsonl:2: turns='both' needs at least two turns"):
        load_mt_bench(path, turns="both")
    with pytest.raises(DataError, match=r"q2\.jsonl:1: needs a 'question_id'"):
        load_mt_bench(write_jsonl(tmp_path / "q2.jsonl", [{"turns": ["a"]}]))
    with pytest.raises(DataError, match=r"q3\.jsonl:1: turns\[1\] must be a non-empty string"):
        load_mt_bench(write_jsonl(tmp_path / "q3.jsonl", [{"question_id": 3, "turns": ["a", ""]}]))
    clash = write_jsonl(tmp_path / "q4.jsonl", [one, {**one, "turns": ["another"]}])
    with pytest.raises(DataError, match=r"q4\.jsonl:2: id 'mt_bench-1' was already given .*q4\.jsonl:1"):
        load_mt_bench(clash)
    with pytest.raises(ValueError, match="turns must be one of"):
        load_mt_bench(path, turns="second")
    assert ids(load_mt_bench([one, one])) == ["mt_bench-1"]  # an exact repeat is one question
    assert ids(load_mt_bench([one, one], dedupe=False)) == ["mt_bench-1", "mt_bench-1#2"]


# --------------------------------------------------------------------------------------------- UltraFeedback

def test_ultrafeedback_binarized():
    items = load_ultrafeedback(FIX / "ultrafeedback_binarized.jsonl")
    p0 = "How many legs do three spiders and two ants have together?"
    assert items[0].prompt == p0 and items[0].id == "ultrafeedback-" + sha(p0)
    meta = items[0].metadata
    assert meta["chosen"].startswith("Spiders have 8 legs") and meta["rejected"] == "About 30 legs."
    assert (meta["score_chosen"], meta["score_rejected"]) == (9.0, 3.0)


def test_ultrafeedback_original_shares_ids_with_binarized():
    orig = load_ultrafeedback(FIX / "ultrafeedback_original.jsonl")
    binarized = load_ultrafeedback(FIX / "ultrafeedback_binarized.jsonl")
    assert orig[0].id == binarized[0].id and orig[0].prompt == binarized[0].prompt
    assert orig[0].metadata["source"] == "flan_v2_niv2"
    assert orig[0].metadata["completions"] == [
        {"model": "model-a", "response": "Spiders have 8 legs and ants have 6, so 3*8 + 2*6 = 36 legs.",
         "overall_score": 8.0, "fine-grained_score": 4.5},
        {"model": "model-b", "response": "About 30 legs.", "overall_score": 3.5, "fine-grained_score": 2.25}]
    assert orig[1].prompt == "Describe a rainy afternoon using only five words."


def test_ultrafeedback_message_rows_and_errors(tmp_path):
    row = {"chosen": [{"role": "user", "content": "Pick a colour."}, {"role": "assistant", "content": "Teal."}],
           "rejected": [{"role": "user", "content": "Pick a colour."}, {"role": "assistant", "content": "No."}]}
    (item,) = load_ultrafeedback([row])
    assert item.prompt == "Pick a colour." and item.metadata["chosen"] == "Teal."
    assert item.metadata["messages"] == [{"role": "user", "content": "Pick a colour."}]
    assert item.metadata["where"] == "row 0"
    path = write_jsonl(tmp_path / "uf.jsonl", [row, {"completions": []}])
    with pytest.raises(DataError, match=r"uf\.jsonl:2: an UltraFeedback row needs 'prompt'"):
        load_ultrafeedback(path)


# ------------------------------------------------------------------------------------------------------- HH

def test_hh_prompts_are_the_context_up_to_the_last_assistant_tag():
    items = load_hh(FIX / "hh_rlhf.jsonl")
    assert len(items) == 3  # rows 1 and 3 share their context: one prompt
    basil, game, bike = items
    assert basil.prompt == "\n\nHuman: How do I keep basil alive on a kitchen windowsill?\n\nAssistant:"
    assert basil.id.startswith("hh-") and basil.id == "hh-" + sha(basil.prompt)[:12]
    assert basil.metadata["chosen"].startswith("Give it at least six hours")
    assert basil.metadata["rejected"] == "Basil is a plant."
    assert game.prompt.endswith("\n\nHuman: Which kind would you pick for kids under eight?\n\nAssistant:")
    assert "\n\nAssistant: Something short with simple rules" in game.prompt  # the multi-turn text is kept
    assert game.metadata["messages"] == [
        {"role": "user", "content": "What is a good first board game for a family?"},
        {"role": "assistant", "content": "Something short with simple rules, like a tile-laying game."},
        {"role": "user", "content": "Which kind would you pick for kids under eight?"}]
    # consecutive Human turns become one user message
    assert bike.metadata["messages"] == [{"role": "user",
                                          "content": "My bike chain keeps slipping.\n\nIt happens mostly on hills."}]
    assert bike.metadata["where"].endswith("hh_rlhf.jsonl:4")


def test_hh_repeats_and_options():
    all_rows = load_hh(FIX / "hh_rlhf.jsonl", dedupe=False)
    assert len(all_rows) == 4 and all_rows[2].id == all_rows[0].id + "#2"
    assert all_rows[2].metadata["chosen"].startswith("Pinch off")
    bare = load_hh(FIX / "hh_rlhf.jsonl", keep_assistant_tag=False)
    assert bare[0].prompt == "\n\nHuman: How do I keep basil alive on a kitchen windowsill?"
    assert not bare[1].prompt.endswith(HH_ASSISTANT_TAG)
    # a split-off "prompt" column and TRL message rows give the same prompt text
    split_row = {"prompt": all_rows[0].prompt, "chosen": " Water it.", "rejected": " Ignore it."}
    msg_row = {"prompt": [{"role": "user", "content": "How do I keep basil alive on a kitchen windowsill?"}],
               "chosen": [{"role": "assistant", "content": "Water it."}]}
    a, b = load_hh([split_row, msg_row], dedupe=False)
    assert a.prompt == b.prompt == all_rows[0].prompt
    assert a.metadata["chosen"] == "Water it." and b.metadata["chosen"] == "Water it."


def test_hh_errors(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        {"chosen": "\n\nHuman: there is no reply tag here", "rejected": "x"}])
    with pytest.raises(DataError, match=r"hh\.jsonl:2, column 'chosen': no '\\n\\nAssistant:' turn"):
        load_hh(path)
    with pytest.raises(DataError, match=r"row 0: an HH row needs 'chosen'"):
        load_hh([{"text": "hi"}])
    with pytest.raises(DataError, match="text before the first"):
        parse_hh_dialogue("preamble\n\nHuman: hi")
    assert parse_hh_dialogue("Human: hi\n\nAssistant: yo") == [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "yo"}]


# ---------------------------------------------------------------------------------------------------- TL;DR

def test_tldr_prompt_rows_are_kept_verbatim():
    items = load_tldr(FIX / "tldr_prompts.jsonl")
    raw = [json.loads(line) for line in (FIX / "tldr_prompts.jsonl").read_text().splitlines()]
    assert [it.prompt for it in items] == [r["prompt"] for r in raw]
    meta = items[0].metadata
    assert (meta["subreddit"], meta["title"]) == ("cats", "New cat (2F) hides all day, how long is normal?")
    assert meta["post"].startswith("My partner and I adopted a cat") and meta["post"].endswith("nothing changes.")
    assert meta["reference"] == "New cat hides all day after a month; how do we help her settle in?"
    assert items[0].id == "tldr-" + sha(items[0].prompt)[:12]


def test_tldr_openai_comparisons():
    items = load_tldr(FIX / "tldr_comparisons_batch.json")  # JSONL content in a .json file, as released
    assert ids(items) == ["tldr-t3_inv001", "tldr-t3_inv002"]  # two comparisons of one post: one prompt
    # the default layout gives the same text as the "prompt"-style set for the same post
    assert items[0].prompt == load_tldr(FIX / "tldr_prompts.jsonl")[0].prompt
    meta = items[0].metadata
    assert meta["post_id"] == "t3_inv001" and meta["subreddit"] == "cats" and meta["choice"] == 1
    assert meta["summaries"] == [" cat hides, what do", " New cat hides all day; how long until she settles?"]
    assert meta["policies"] == ["sup1", "ref"]
    assert ids(load_tldr(FIX / "tldr_comparisons_batch.json", dedupe=False))[1] == "tldr-t3_inv001#2"
    custom = load_tldr(FIX / "tldr_comparisons_batch.json", layout="[{subreddit}] {title}\n\n{post}\n\nShort summary:")
    assert custom[1].prompt.startswith("[legaladvice] Rent increase with short notice\n\nOur landlord")
    assert tldr_prompt(" text ", "T", "r/sub") == "SUBREDDIT: r/sub\nTITLE: T\nPOST: text\nTL;DR:"


def test_tldr_errors(tmp_path):
    path = write_jsonl(tmp_path / "cmp.jsonl", [{"info": {"id": "a", "title": "t", "subreddit": "s"},
                                                  "summaries": []}])
    with pytest.raises(DataError, match=r"cmp\.jsonl:1, 'info': missing column 'post'"):
        load_tldr(path)
    with pytest.raises(DataError, match=r"row 0: a TL;DR row needs 'prompt' or 'info'"):
        load_tldr([{"summary": "x"}])
    with pytest.raises(ValueError, match="layout must contain"):
        load_tldr(path, layout="{post}")


# -------------------------------------------------------------------------------------------------- generic

def test_generic_columns():
    items = load_generic(FIX / "generic_prompts.jsonl", preference_column="preference")
    assert ids(items) == ["q-1", "q-2", "2"]  # the id column, else the row index (as generate.py does)
    assert items[0].preference == "Answer in one word." and items[1].preference is None
    assert items[0].metadata["topic"] == "gardening" and "preference" not in items[0].metadata
    only = load_generic(FIX / "generic_prompts.jsonl", metadata_columns=[], id_column=None, id_prefix="g")
    assert ids(only) == ["g-0", "g-1", "g-2"] and set(only[0].metadata) == {"prompt_set", "where"}
    renamed = load_generic([{"question": "Why?", "n": 1}], prompt_column="question")
    assert renamed[0].prompt == "Why?" and renamed[0].metadata["n"] == 1


def test_generic_parquet_and_datasets_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "First prompt.", "uid": 7}, {"text": "Second prompt.", "uid": 8}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    items = load_prompt_set("generic", tmp_path / "p.parquet", prompt_column="text", id_column="uid")
    assert ids(items) == ["7", "8"] and items[1].metadata["where"].endswith("p.parquet row 1")

    import datasets

    dd = datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list([{"prompt": "a", "prompt_id": "x"}]),
                               "test_prefs": datasets.Dataset.from_list([{"prompt": "b", "prompt_id": "y"}])})
    dd.save_to_disk(str(tmp_path / "uf"))
    (item,) = load_prompt_set("ultrafeedback", tmp_path / "uf", split="test_prefs")
    assert item.id == "ultrafeedback-y" and item.prompt == "b" and "[test_prefs] row 0" in item.metadata["where"]
    with pytest.raises(DataError, match="say which one with split"):
        load_prompt_set("ultrafeedback", tmp_path / "uf")
    (mem,) = load_ultrafeedback(dd, split="train_prefs")  # an in-memory DatasetDict
    assert mem.id == "ultrafeedback-x"


def test_generic_errors(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    with pytest.raises(DataError, match=r"g\.jsonl:2: column 'prompt' is empty"):
        load_generic(path)
    with pytest.raises(DataError, match=r"row 1: preference column 'z' must be a string"):
        load_generic([{"prompt": "a"}, {"prompt": "b", "z": 3}], preference_column="z")
    with pytest.raises(DataError, match=r"row 1: id 'a' was already given to a different prompt at row 0"):
        load_generic([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_generic(bad)
    with pytest.raises(DataError, match="no prompts"):
        load_generic([])


# ------------------------------------------------------------------------------------------------- registry

def test_registry_names_aliases_options_and_limit():
    assert {"alpaca_eval", "mt_bench", "ultrafeedback", "hh", "tldr", "jsonl", "generic"} <= set(prompt_set_names())
    assert ids(load_prompt_set("MT-Bench", FIX / "mt_bench_question.jsonl", turns="both", limit=2)) == \
        ["mt_bench-501", "mt_bench-502"]
    assert len(load_prompt_set("anthropic_hh", FIX / "hh_rlhf.jsonl")) == 3
    assert ids(load_prompt_set("jsonl", FIX / "generic_prompts.jsonl"))[0] == "q-1"
    assert load_prompt_set("alpaca_eval", FIX / "alpaca_eval.json", split="train")[0].id == "alpaca_eval-0"
    with pytest.raises(ValueError, match="unknown prompt set 'arena'"):
        load_prompt_set("arena", FIX / "alpaca_eval.json")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['turns'\]"):
        load_prompt_set("alpaca_eval", FIX / "alpaca_eval.json", turns="both")
    with pytest.raises(DataError, match="split 'test' asked for"):
        load_prompt_set("mt_bench", FIX / "mt_bench_question.jsonl", split="test")
    with pytest.raises(ValueError, match="limit"):
        load_prompt_set("hh", FIX / "hh_rlhf.jsonl", limit=0)
    register_prompt_set("my-set", lambda source, split=None: [PromptItem("x", str(source))])
    try:
        assert load_prompt_set("my_set", "anything")[0].prompt == "anything"
    finally:
        PROMPT_SETS.pop("my_set")
