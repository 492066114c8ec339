"""Readers (JSONL, Parquet, datasets), pair validation, prompt-masked tokenisation, Sr-DPO views, truncation
and collation. The reference for every boundary is the tokenisation of the whole rendered conversation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prs_jax.data.batching import ExampleSource, bucket_length, pad_id_of
from prs_jax.data.io import iter_rows, read_rows, write_jsonl
from prs_jax.data.pairs import (
    PreferencePair, augment_prompt, collate_pairs, load_pairs, parse_pair, tokenize_pair, tokenize_pair_views,
    tokenize_pairs,
)
from prs_jax.errors import DataError, TokenizerError
from prs_jax.models.tokenizer import encode_chat, load_tokenizer

USER = [{"role": "user", "content": "What is the capital of France?"}]
CHOSEN = [{"role": "assistant", "content": "Paris is the capital."}]
REJECTED = [{"role": "assistant", "content": "Lyon."}]
CONV = {"prompt": USER, "chosen": CHOSEN, "rejected": REJECTED}
TEXT = {"prompt": "Question: what is the capital of France?\nAnswer:", "chosen": " Paris.", "rejected": " Lyon."}
P = "Give an answer rated 100 out of 100."


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------ readers

def test_jsonl_rows_and_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(TEXT) + "\n\n" + json.dumps(CONV) + "\n")
    rows = list(iter_rows(path))
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:3"]
    assert rows[1].data == CONV and read_rows(path)[0] == TEXT

    path.write_text(json.dumps(TEXT) + "\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: invalid JSON"):
        read_rows(path)
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: expected a JSON object"):
        read_rows(path)


def test_json_array_and_gzipped_jsonl(tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps([TEXT, CONV], indent=1))
    assert read_rows(tmp_path / "pairs.json") == [TEXT, CONV]
    (tmp_path / "bad.json").write_text('[\n{"prompt": 1},\n{oops}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        read_rows(tmp_path / "bad.json")
    gz = write_jsonl(tmp_path / "pairs.jsonl.gz", [TEXT, CONV])
    assert [r.where for r in iter_rows(gz)] == [f"{gz}:1", f"{gz}:2"] and read_rows(gz) == [TEXT, CONV]


@pytest.mark.parametrize("row, match", [
    ({"prompt": "x", "chosen": "y"}, r"missing column\(s\) 'rejected'"),
    ({"chosen": "y", "rejected": "z"}, r"missing column\(s\) 'prompt'"),
    ({"prompt": "x", "chosen": "  ", "rejected": "z"}, r"'chosen' is empty"),
    ({"prompt": "x", "chosen": [], "rejected": "z"}, r"'chosen' is empty"),
    ({"prompt": "x", "chosen": 3, "rejected": "z"}, r"'chosen' must be a string or a list of messages"),
    ({"prompt": "x", "chosen": CHOSEN, "rejected": REJECTED}, r"'prompt' is a string but a response is a list"),
    ({"prompt": USER, "chosen": [{"role": "assistant"}], "rejected": REJECTED}, r"'chosen', message 0"),
    ({"prompt": USER, "chosen": USER, "rejected": REJECTED}, r"'chosen' must end with an assistant message"),
    ({**TEXT, "margin": "big"}, r"'margin' must be a number"),
    ({**TEXT, "p_chosen": 1.5}, r"'p_chosen' must be a finite number in \[0.0, 1.0\]"),
])
def test_validation_errors_name_file_line_and_column(tmp_path, row, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [TEXT, TEXT, row])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: .*" + match):
        load_pairs(path)


def test_parquet_reader_conversational_with_margin_and_row_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{**CONV, "margin": 2.0}, {**CONV, "margin": None}]), path)
    pairs = load_pairs(path)
    assert pairs[0].prompt == USER and pairs[0].chosen == CHOSEN and pairs[0].margin == 2.0
    assert pairs[1].margin is None and pairs[1].where == f"{path} row 1"
    pq.write_table(pa.Table.from_pylist([TEXT, {**TEXT, "rejected": ""}]), path)
    with pytest.raises(DataError, match=r"pairs\.parquet row 1: column 'rejected' is empty"):
        load_pairs(path)


def test_saved_datasets_directory_and_splits(tmp_path):
    import datasets

    datasets.Dataset.from_list([CONV, CONV]).save_to_disk(str(tmp_path / "single"))
    pairs = load_pairs(tmp_path / "single")
    assert len(pairs) == 2 and pairs[0].chosen == CHOSEN and pairs[1].where.endswith("row 1")

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([TEXT]),
                               "test": datasets.Dataset.from_list([{**TEXT, "p_chosen": 0.75}])})
    dd.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"holds splits .*split="):
        read_rows(tmp_path / "dict")
    test = load_pairs(tmp_path / "dict", split="test")
    assert test[0].p_chosen == 0.75 and "[test] row 0" in test[0].where
    with pytest.raises(DataError, match="no split 'dev'"):
        read_rows(tmp_path / "dict", split="dev")


def test_load_dataset_on_a_local_directory_and_missing_sources(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    write_jsonl(tmp_path / "raw" / "train.jsonl", [TEXT])
    assert read_rows(tmp_path / "raw", split="train") == [TEXT]
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "absent.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data file type"):
        read_rows(tmp_path / "x.csv")
    with pytest.raises(DataError, match="single file holds one split"):
        read_rows(tmp_path / "raw" / "train.jsonl", split="test")


# -------------------------------------------------------------------------------------------- tokenisation

def test_conversational_boundary_equals_full_tokenisation(tok):
    system = [{"role": "system", "content": "Be brief."}]
    pairs, report = tokenize_pairs([CONV, {**CONV, "prompt": system + USER}], tok)
    assert report.rows == report.kept == 2 and report.boundary_fallbacks == 0
    for pair, prompt in zip(pairs, [USER, system + USER]):
        assert list(pair.prompt_ids) == encode_chat(tok, prompt, add_generation_prompt=True)
        assert list(pair.chosen_input_ids) == encode_chat(tok, prompt + CHOSEN, add_generation_prompt=False)
        assert list(pair.rejected_input_ids) == encode_chat(tok, prompt + REJECTED, add_generation_prompt=False)
    assert tok.decode(pairs[0].chosen_ids) == "Paris is the capital.<|end|>\n"


def test_implicit_prompt_and_string_responses_match_explicit(tok):
    explicit = tokenize_pair(parse_pair(CONV), tok)
    implicit = tokenize_pair(parse_pair({"chosen": USER + CHOSEN, "rejected": USER + REJECTED}), tok)
    wrapped = tokenize_pair(parse_pair({"prompt": USER, "chosen": CHOSEN[0]["content"],
                                        "rejected": REJECTED[0]["content"]}), tok)
    for other in (implicit, wrapped):
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            np.testing.assert_array_equal(getattr(other, name), getattr(explicit, name))
    with pytest.raises(DataError, match="do not share leading messages"):
        parse_pair({"chosen": CHOSEN, "rejected": REJECTED})


def test_raw_text_pairs_append_eos_and_match_full_tokenisation(tok):
    (pair,), report = tokenize_pairs([TEXT], tok)
    assert report.boundary_fallbacks == 0
    assert list(pair.prompt_ids) == ids(tok, TEXT["prompt"])
    assert list(pair.chosen_input_ids) == ids(tok, TEXT["prompt"] + TEXT["chosen"]) + [tok.eos_token_id]
    assert pair.rejected_ids[-1] == tok.eos_token_id


def test_boundary_merge_falls_back_and_is_counted(tok):
    row = {"prompt": "Answer: ", "chosen": "Paris", "rejected": "Lyon"}
    (pair,), report = tokenize_pairs([row], tok)
    assert report.boundary_fallbacks == 1 and report.template_mismatches == 0
    assert list(pair.prompt_ids) == ids(tok, "Answer: ")
    assert tok.decode(pair.chosen_input_ids) == "Answer: Paris<|end|>"


def test_template_whose_generation_prompt_is_not_a_prefix(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\nthink:{% endif %}")
    (pair,), report = tokenize_pairs([CONV], tok)
    assert report.boundary_fallbacks == 1 and report.template_mismatches == 1
    assert tok.decode(pair.prompt_ids).endswith("<|assistant|>\nthink:")
    assert tok.decode(pair.chosen_ids) == "Paris is the capital.<|end|>\n"


def test_chat_mode_needs_a_template_and_use_chat_template_wraps_text(tok, tokenizer_dir):
    bare = load_tokenizer(tokenizer_dir)
    bare.chat_template = None
    with pytest.raises(TokenizerError, match=r"row 0: .*needs a chat template .*tokenizer has none"):
        tokenize_pairs([CONV], bare)
    (wrapped,), _ = tokenize_pairs([{"prompt": USER[0]["content"], "chosen": CHOSEN[0]["content"],
                                     "rejected": REJECTED[0]["content"]}], tok, use_chat_template=True)
    assert list(wrapped.chosen_input_ids) == encode_chat(tok, USER + CHOSEN, add_generation_prompt=False)
    with pytest.raises(DataError, match="use_chat_template=False"):
        tokenize_pairs([CONV], tok, use_chat_template=False)


@settings(max_examples=25, deadline=None)
@given(prompt=st.text("ab .:!\n", min_size=1, max_size=12).filter(str.strip),
       response=st.text("ab .:!\n", min_size=1, max_size=12).filter(str.strip))
def test_raw_prompt_plus_response_keeps_the_text(tok, prompt, response):
    (pair,), _ = tokenize_pairs([{"prompt": prompt, "chosen": response, "rejected": response}], tok)
    assert tok.decode(pair.prompt_ids) == prompt
    assert tok.decode(pair.chosen_input_ids) == prompt + response + "<|end|>"


# -------------------------------------------------------------------------------------- Sr-DPO: p (+) x

@pytest.mark.parametrize("placement, prompt, expected", [
    ("user_turn_start", USER, f"<|user|>\n{P}\n\nWhat is the capital of France?<|end|>\n<|assistant|>\n"),
    ("system", USER, f"<|system|>\n{P}<|end|>\n<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"),
    ("system", [{"role": "system", "content": "Be brief."}] + USER,
     f"<|system|>\n{P}\n\nBe brief.<|end|>\n<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"),
    ("raw_prefix", USER, f"{P}\n\n<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"),
])
def test_prompt_prefix_placements(tok, placement, prompt, expected):
    pair = parse_pair({**CONV, "prompt": prompt})
    plain, aug = tokenize_pair_views(pair, tok, P, placement=placement)
    np.testing.assert_array_equal(plain.prompt_ids, tokenize_pair(pair, tok).prompt_ids)
    assert tok.decode(aug.prompt_ids) == expected
    np.testing.assert_array_equal(aug.chosen_ids, plain.chosen_ids)
    np.testing.assert_array_equal(aug.rejected_ids, plain.rejected_ids)


def test_prefix_on_multi_turn_goes_to_last_user_turn_and_raw_text(tok):
    turns = USER + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
    assert augment_prompt(turns, P)[2]["content"] == f"{P}\n\nAnd Spain?"
    assert augment_prompt("x", P, "system") == f"{P}\n\nx"
    (pair,), _ = tokenize_pairs([TEXT], tok, prompt_prefix=P)
    assert tok.decode(pair.augmented.prompt_ids) == f"{P}\n\n{TEXT['prompt']}"
    with pytest.raises(DataError, match="needs a user message"):
        tokenize_pairs([{**CONV, "prompt": [{"role": "system", "content": "s"}]}], tok, prompt_prefix=P)


# ------------------------------------------------------------------------------------------------ truncation

LONG = {"prompt": "one two three four five six seven eight nine ten", "chosen": " alpha beta gamma",
        "rejected": " delta"}


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_keeps_prompt_start_or_end_and_counts(tok, mode):
    (full,), _ = tokenize_pairs([LONG], tok)
    n_prompt = len(full.prompt_ids)
    max_length = 4 + 3
    pairs, report = tokenize_pairs([LONG, TEXT], tok, max_length=max_length + 40, max_prompt_length=4,
                                   truncation=mode)
    expected = full.prompt_ids[:4] if mode == "keep_start" else full.prompt_ids[n_prompt - 4:]
    np.testing.assert_array_equal(pairs[0].prompt_ids, expected)
    np.testing.assert_array_equal(pairs[0].chosen_ids, full.chosen_ids)
    assert report.prompt_truncated == 2 and report.response_truncated == 0  # TEXT's prompt is long too
    (cut,), report = tokenize_pairs([LONG], tok, max_length=max_length, max_prompt_length=4, truncation=mode)
    assert len(cut.chosen_ids) == 3 and len(cut.rejected_ids) == min(3, len(full.rejected_ids))
    np.testing.assert_array_equal(cut.chosen_ids, full.chosen_ids[:3])
    assert report.prompt_truncated == 1 and report.response_truncated == 1 and report.longest_sequence == 7


def test_too_long_prompt_errors_or_drops(tok):
    (full,), _ = tokenize_pairs([LONG], tok)
    limit = len(full.prompt_ids)
    with pytest.raises(DataError, match=rf"row 1: the prompt has {limit} tokens.*max_length={limit}"):
        tokenize_pairs([TEXT, LONG], tok, max_length=limit)
    pairs, report = tokenize_pairs([TEXT, LONG], tok, max_length=limit, on_too_long="drop")
    assert len(pairs) == report.kept == 1 and report.dropped_too_long == 1 and report.dropped_where == ["row 1"]
    assert "1/2 rows kept" in report.summary() and "dropped too long: 1" in report.summary()
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_pairs([TEXT], tok, max_length=8, max_prompt_length=8)


def test_sr_views_truncate_to_the_same_response_and_count_a_cut_prefix(tok):
    (plain,), _ = tokenize_pairs([CONV], tok)
    max_length = len(plain.prompt_ids) + 4
    (pair,), report = tokenize_pairs([CONV], tok, prompt_prefix=P, max_length=max_length + len(ids(tok, P)))
    aug = pair.augmented
    np.testing.assert_array_equal(aug.chosen_ids, pair.chosen_ids)
    assert len(aug.prompt_ids) + len(aug.chosen_ids) <= max_length + len(ids(tok, P))
    assert report.response_truncated == 1 and report.prefix_truncated == 0
    # keep_end with a short max_prompt_length cuts into the start of the prompt, where p sits
    _, report = tokenize_pairs([CONV], tok, prompt_prefix=P, max_prompt_length=3, truncation="keep_end")
    assert report.prefix_truncated == 1


# ------------------------------------------------------------------------------------------------ collation

def _scored(view, i, v, seq):
    """Token ids scored for sequence `seq` of row (i, v) of a TokenBatch."""
    keep = view.target_seq[i, v] == seq
    return view.tokens[i, v][view.target_slot[i, v][keep]]


def test_collate_pairs_masks_shapes_and_labels(tok):
    rows = [{**TEXT, "margin": 1.0, "p_chosen": 0.9}, {**LONG, "margin": -0.5, "p_chosen": 0.2}]
    pairs, _ = tokenize_pairs(rows, tok)
    pad = pad_id_of(tok)
    sep = collate_pairs(pairs, max_length=64, pad_id=pad, multiple=16, layout="separate").x
    t = sep.tokens.shape[2]
    assert t % 16 == 0 and t == bucket_length(max(len(p.chosen_input_ids) for p in pairs), multiple=16)
    assert sep.tokens.shape == sep.segment_ids.shape == (2, 2, t) and sep.tokens.dtype == np.int32
    for v, side in enumerate(("chosen", "rejected")):
        for i, p in enumerate(pairs):
            resp = getattr(p, f"{side}_ids")
            seq = np.concatenate([p.prompt_ids, resp])
            hi = len(seq)
            np.testing.assert_array_equal(sep.tokens[i, v, :hi], seq)
            assert (sep.tokens[i, v, hi:] == pad).all()
            np.testing.assert_array_equal(sep.segment_ids[i, v] > 0, np.arange(t) < hi)
            np.testing.assert_array_equal(sep.positions[i, v, :hi], np.arange(hi))
            np.testing.assert_array_equal(_scored(sep, i, v, 0), resp)
    packed = collate_pairs(pairs, max_length=64, pad_id=pad, multiple=16)
    for i, p in enumerate(pairs):  # one row: [prompt | chosen | rejected], rejected's positions after the prompt
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        np.testing.assert_array_equal(packed.x.tokens[i, 0, :n_p + n_c + n_r],
                                      np.concatenate([p.prompt_ids, p.chosen_ids, p.rejected_ids]))
        np.testing.assert_array_equal(packed.x.positions[i, 0, n_p + n_c:n_p + n_c + n_r], n_p + np.arange(n_r))
        np.testing.assert_array_equal(_scored(packed.x, i, 0, 0), p.chosen_ids)
        np.testing.assert_array_equal(_scored(packed.x, i, 0, 1), p.rejected_ids)
    np.testing.assert_allclose(packed.margin, [1.0, -0.5])
    np.testing.assert_allclose(packed.p_chosen, [0.9, 0.2])
    assert collate_pairs(pairs, max_length=48, pad_id=pad, pad_to="max_length",
                         layout="separate").x.tokens.shape == (2, 2, 48)
    assert collate_pairs(pairs, max_length=48, pad_id=pad, pad_to="max_length").x.tokens.shape == (2, 1, 96)
    with pytest.raises(DataError, match="more than max_length=8"):
        collate_pairs(pairs, max_length=8, pad_id=pad)
    mixed, _ = tokenize_pairs([TEXT, {**TEXT, "margin": 1.0}], tok)
    with pytest.raises(DataError, match="some rows have 'margin'"):
        collate_pairs(mixed)


def test_collate_sr_views_and_example_source(tok):
    pairs, _ = tokenize_pairs([CONV, TEXT], tok, prompt_prefix=P)
    source = ExampleSource(pairs, lambda ex: collate_pairs(ex, max_length=128, pad_id=0))
    batch, static = source.collate(np.array([1, 0]))
    assert static is None and len(source) == 2
    assert batch.aug is not None and batch.margin is None and batch.ref_chosen is None
    for view in (batch.x, batch.aug):
        np.testing.assert_array_equal([len(_scored(view, i, 0, 0)) for i in range(2)],
                                      [len(pairs[1].chosen_ids), len(pairs[0].chosen_ids)])
    # the p (+) x rows carry the prefix before the same response tokens
    aug = batch.aug
    n_p = len(pairs[0].augmented.prompt_ids)
    text = tok.decode(np.concatenate([aug.tokens[1, 0, :n_p], _scored(aug, 1, 0, 0)]))
    assert P in text and text.endswith("Paris is the capital.<|end|>\n")


def test_plain_dicts_and_pair_objects_are_accepted(tok):
    pair = PreferencePair(prompt="Q:", chosen=" a", rejected=" b", where="mine")
    out, report = tokenize_pairs([pair, TEXT], tok)
    assert report.kept == 2 and out[0].where == "mine" and out[1].where == "row 1"
