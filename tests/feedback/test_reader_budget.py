"""Label reading is memory-bounded: programs are sized by a token budget (rows x padded length) and an
activation budget, so long inputs run in several programs and give the same log-probs as one big program."""

from __future__ import annotations

import numpy as np
import pytest

from prs_jax.feedback.reader import LabelReader, ReaderConfig, read_texts
from prs_jax.tree.engine import TreeEngine


@pytest.fixture(scope="module")
def model_and_tok(make_checkpoint):
    from prs_jax.models import load_causal_lm, load_tokenizer

    path = make_checkpoint("llama", max_position_embeddings=2048)
    return load_causal_lm(path), load_tokenizer(path)


def test_long_label_inputs_split_by_token_budget_give_the_same_log_probs(model_and_tok):
    model, tok = model_and_tok
    long_ctx = " ".join(f"token{i}" for i in range(80))
    groups = [[f"{long_ctx} case {i} first. Answer:", f"{long_ctx} case {i} second. Answer:"] for i in range(5)]
    groups += [["Short one. Answer:", "Short two. Answer:", "Short three. Answer:"]]
    labels = [" yes", " no"]

    def run(cfg):
        reader = LabelReader(TreeEngine(model, tok, seed=0), cfg)
        return read_texts(reader, groups, labels, chat=False), reader.last_chunks

    want, big = run(ReaderConfig(token_budget=1 << 20))
    budget = 256
    got, small = run(ReaderConfig(token_budget=budget))
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.concatenate(g), np.concatenate(w), atol=1e-5)
    assert len(small) > len(big)
    assert any(p + t > 64 for _, _, p, t in small)  # the long inputs ran, split
    assert all(g * n * (p + t) <= budget or g * n == 1 for g, n, p, t in small)
