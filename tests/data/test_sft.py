"""SFT rows: messages (loss on assistant turns), prompt/completion, text; truncation and collation."""

from __future__ import annotations

import numpy as np
import pytest

from prs_jax.data.io import write_jsonl
from prs_jax.data.sft import collate_sft, load_sft, parse_sft, tokenize_sft
from prs_jax.errors import DataError
from prs_jax.models.tokenizer import encode_chat, load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "apple"},
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def scored_text(tok, ex):
    return tok.decode(ex.input_ids[ex.loss_mask == 1])


def test_messages_score_every_assistant_turn(tok):
    (ex,), report = tokenize_sft([{"messages": CONVERSATION}], tok)
    assert list(ex.input_ids) == encode_chat(tok, CONVERSATION, add_generation_prompt=False)
    assert list(ex.prompt_ids) == encode_chat(tok, CONVERSATION[:2], add_generation_prompt=True)
    assert scored_text(tok, ex) == "Hello.<|end|>\napple<|end|>\n"
    assert report.kept == 1 and report.single_turn_fallbacks == 0 and report.boundary_fallbacks == 0


def test_messages_last_assistant_only(tok):
    (ex,), _ = tokenize_sft([{"messages": CONVERSATION}], tok, loss_on="last_assistant")
    assert list(ex.input_ids) == encode_chat(tok, CONVERSATION, add_generation_prompt=False)
    assert scored_text(tok, ex) == "apple<|end|>\n"


def test_template_that_rewrites_history_falls_back_to_the_final_turn(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    # earlier assistant turns are hidden once a later turn exists (as reasoning-stripping templates do)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n"
                         "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}"
                         "{% endif %}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    (ex,), report = tokenize_sft([{"messages": CONVERSATION}], tok)
    assert report.single_turn_fallbacks == 1
    assert scored_text(tok, ex) == "apple<|end|>\n"


def test_prompt_completion_text_and_conversational(tok):
    rows = [{"prompt": "Q: a fruit?\nA:", "completion": " apple"},
            {"prompt": CONVERSATION[1:2], "completion": [{"role": "assistant", "content": "Hello."}]},
            {"text": "The quick brown fox."}]
    (raw, conv, text), report = tokenize_sft(rows, tok)
    assert report.kept == 3
    assert scored_text(tok, raw) == " apple<|end|>" and tok.decode(raw.prompt_ids) == "Q: a fruit?\nA:"
    assert list(conv.input_ids) == encode_chat(tok, CONVERSATION[1:3], add_generation_prompt=False)
    assert scored_text(tok, conv) == "Hello.<|end|>\n"
    assert len(text.prompt_ids) == 0 and text.loss_mask.all()
    assert tok.decode(text.input_ids) == "The quick brown fox.<|end|>"


@pytest.mark.parametrize("row, match", [
    ({"messages": CONVERSATION[:4]}, "must end with an assistant message"),
    ({"messages": CONVERSATION[1:2]}, "no assistant message"),
    ({"messages": CONVERSATION[2:3]}, "starts with an assistant message"),
    ({"messages": CONVERSATION, "prompt": "x"}, "both 'messages' and 'prompt'"),
    ({"prompt": "x"}, r"missing column\(s\) 'completion'"),
    ({"prompt": "x", "completion": ""}, "'completion' is empty"),
    ({"answer": "x"}, r"missing column\(s\) 'messages'.*'prompt' and 'completion', or 'text'"),
])
def test_sft_validation_names_file_and_line(tmp_path, row, match):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"text": "ok"}, row])
    with pytest.raises(DataError, match=r"sft\.jsonl:2: .*" + match):
        load_sft(path)


def test_sft_truncation_and_collation(tok):
    rows = [{"prompt": "one two three four five six", "completion": " seven eight nine ten"},
            {"messages": CONVERSATION}]
    (full, conv), _ = tokenize_sft(rows, tok)
    examples, report = tokenize_sft(rows, tok, max_length=8, max_prompt_length=3, truncation="keep_end")
    assert report.prompt_truncated == 2 and report.response_truncated == 2
    np.testing.assert_array_equal(examples[0].prompt_ids, full.prompt_ids[-3:])
    np.testing.assert_array_equal(examples[0].response_ids, full.response_ids[:5])
    np.testing.assert_array_equal(examples[1].response_loss_mask, conv.response_loss_mask[:5])
    batch = collate_sft(examples, max_length=8, pad_id=0, pad_to="max_length")
    assert batch.tokens.shape == batch.segment_ids.shape == batch.positions.shape == (2, 1, 8)
    scored = np.zeros(8, int)
    scored[batch.target_slot[0, 0][batch.target_seq[0, 0] >= 0]] = 1
    np.testing.assert_array_equal(scored, [0, 0, 0, 1, 1, 1, 1, 1])
    batch = collate_sft([full, conv], pad_id=0, multiple=16)
    t = batch.tokens.shape[2]
    assert t % 16 == 0
    for i, ex in enumerate([full, conv]):
        n = len(ex.input_ids)
        np.testing.assert_array_equal(batch.segment_ids[i, 0] > 0, np.arange(t) < n)
        scored = np.zeros(t, np.int32)
        scored[batch.target_slot[i, 0][batch.target_seq[i, 0] >= 0]] = 1
        np.testing.assert_array_equal(scored[:n], ex.loss_mask * (np.arange(n) > 0))
        assert scored[n:].sum() == 0 and (batch.tokens[i, 0, n:] == 0).all()
        np.testing.assert_array_equal(batch.context_slot[i, 0][batch.target_seq[i, 0] >= 0] + 1,
                                      batch.target_slot[i, 0][batch.target_seq[i, 0] >= 0])

    short = {"prompt": "Hi", "completion": " there"}
    with pytest.raises(DataError, match=f"row 1: the prompt has {len(conv.prompt_ids)} tokens"):
        tokenize_sft([short, rows[1]], tok, max_length=10)
    kept, report = tokenize_sft([short, rows[1]], tok, max_length=10, on_too_long="drop")
    assert len(kept) == 1 and report.dropped_too_long == 1 and report.dropped_where == ["row 1"]


def test_parse_sft_kinds():
    assert parse_sft({"messages": CONVERSATION}).kind == "messages"
    assert parse_sft({"prompt": "a", "completion": "b"}).kind == "prompt_completion"
    assert parse_sft({"text": "t"}).kind == "text"
