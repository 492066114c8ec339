"""The jit decode loop: greedy equals transformers' greedy generate; sampling truncation; bad inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prs_jax.models import load_causal_lm
from prs_jax.tree.decode import generate, left_pad
from prs_jax.tree.sampling import SamplingParams, truncate


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_greedy_matches_transformers_generate(model_type, make_checkpoint, hf_ref):
    import torch

    path = make_checkpoint(model_type)
    model = load_causal_lm(path)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(7, 500, size=n)) for n in (9, 4, 6)]
    ids, mask = left_pad(prompts, pad_id=0)
    n_new = 12
    out = generate(model, ids, mask, max_new_tokens=n_new, sampling=SamplingParams(greedy=True), eos_ids=[6],
                   pad_id=0)
    ref_model = hf_ref.causal_lm(path)
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor(np.asarray(ids), dtype=torch.long),
                                 attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
                                 max_new_tokens=n_new, do_sample=False, eos_token_id=6, pad_token_id=0)
    ref_new = ref[:, ids.shape[1]:].numpy()
    ours = np.asarray(out.tokens)
    for i in range(len(prompts)):
        n = int(out.lengths[i])
        np.testing.assert_array_equal(ours[i, :n], ref_new[i, :n])
    # greedy log-probs are those of the full softmax at each step
    assert np.all(np.asarray(out.logprobs) <= 0)


def test_same_seed_same_samples_and_lengths(llama_dir):
    model = load_causal_lm(llama_dir)
    ids, mask = left_pad([[5, 6, 7], [8, 9]], pad_id=0)
    kw = dict(max_new_tokens=10, sampling=SamplingParams(temperature=1.3, top_k=50), eos_ids=[6], pad_id=0)
    a = generate(model, ids, mask, key=jax.random.key(1), **kw)
    b = generate(model, ids, mask, key=jax.random.key(1), **kw)
    c = generate(model, ids, mask, key=jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    for row, n in zip(np.asarray(a.tokens), np.asarray(a.lengths)):
        assert (row[n:] == 0).all()
        assert 6 not in row[: max(n - 1, 0)]


def test_row_keys_make_a_row_independent_of_its_batch(llama_dir):
    """With one key per row, a row samples the same tokens alone, in another batch, or at another position."""
    model = load_causal_lm(llama_dir)
    kw = dict(max_new_tokens=8, sampling=SamplingParams(temperature=1.5), eos_ids=[], pad_id=0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    keys = [jax.random.fold_in(jax.random.key(3), i) for i in range(3)]

    def run(order):
        ids, mask = left_pad([prompts[i] for i in order], pad_id=0, length=4)
        out = generate(model, ids, mask, row_keys=jnp.stack([keys[i] for i in order]), **kw)
        return {i: np.asarray(out.tokens[j]).tolist() for j, i in enumerate(order)}

    together = run([0, 1, 2])
    assert together == run([2, 0, 1]) | run([1]) and together[0] == run([0, 2])[0]
    assert together[0] != together[1]
    with pytest.raises(ValueError, match="one key per row"):
        ids, mask = left_pad(prompts, pad_id=0)
        generate(model, ids, mask, row_keys=jnp.stack(keys[:2]), **kw)


def test_truncation_top_k_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
    k2 = truncate(logits, SamplingParams(top_k=2))
    assert np.isfinite(np.asarray(k2)).sum() == 2
    p = truncate(logits, SamplingParams(top_p=0.7))  # 0.5 + 0.25 reaches 0.7
    np.testing.assert_array_equal(np.isfinite(np.asarray(p))[0], [True, True, False, False])


def test_bad_inputs(llama_dir):
    model = load_causal_lm(llama_dir)
    ids, mask = left_pad([[5, 6]], pad_id=0)
    with pytest.raises(ValueError, match="exceeds the context window"):
        generate(model, ids, mask, max_new_tokens=10_000)
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        left_pad([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingParams(temperature=0.0)
