"""Tokenizer loading from local dirs and chat-template rendering."""

from __future__ import annotations

import json

import pytest

from prs_jax.errors import TokenizerError
from prs_jax.models import encode_chat, load_tokenizer, render_chat


def test_chat_template_renders(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    text = render_chat(tok, msgs)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nHello there<|end|>\n<|assistant|>\n"
    ids = encode_chat(tok, msgs)
    assert ids[0] == tok.convert_tokens_to_ids("<|system|>")
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|end|>" and tok.pad_token_id == 0


def test_missing_chat_template_is_clear(tokenizer_dir, tmp_path):
    import shutil

    dst = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(dst)
    with pytest.raises(TokenizerError, match="no chat template"):
        render_chat(tok, [{"role": "user", "content": "hi"}])


def test_bad_inputs(tmp_path, tokenizer_dir):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    tok = load_tokenizer(tokenizer_dir)
    with pytest.raises(TokenizerError, match="message list is empty"):
        render_chat(tok, [])
    with pytest.raises(TokenizerError, match="message 0 must be a dict"):
        render_chat(tok, [{"text": "hi"}])
