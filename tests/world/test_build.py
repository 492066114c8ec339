"""`world build` at a micro size: artefacts, the cache, determinism (same seed -> identical weights)."""

import hashlib
import json

from prs_jax.models import load_causal_lm, load_tokenizer
from prs_jax.models.tokenizer import render_chat
from prs_jax.world.build import build_world, preset, world_key
from prs_jax.world.corpus import FEEDBACK_TURN


def _micro(**kw):
    return preset("smoke", train_prompts=40, heldout_prompts=4, sft_conversations=48, sft_eval_conversations=8,
                  rm_pairs=32, rm_eval_pairs=16, sft_steps=3, sft_batch_size=8, rm_steps=2, rm_batch_size=8, **kw)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_cache_and_determinism(tmp_path):
    cfg = _micro()
    a = build_world(cfg, root=tmp_path / "a", progress=False)
    for sub in ("policy/config.json", "policy/model.safetensors", "rm/config.json", "tokenizer/tokenizer.json",
                "data/sft.jsonl", "data/rm_train.jsonl", "data/heldout_prompts.jsonl", "report.json"):
        assert (a.root / sub).is_file(), sub
    assert a.root.name == f"world-{world_key(cfg)}"
    report = json.loads((a.root / "report.json").read_text())
    assert 0.0 <= report["rm_heldout_accuracy"] <= 1.0 and report["timings"]["total_s"] > 0
    assert len(a.heldout()) == 4 and all(r["preference"] for r in a.heldout())
    # the cache: the same config is reused, a different one gets its own directory
    again = build_world(cfg, root=tmp_path / "a", progress=False)
    assert again.root == a.root and again.report == a.report
    assert world_key(_micro(seed=1)) != world_key(cfg)
    # determinism: an independent build with the same seed gives the same tokenizer, data and weights
    b = build_world(cfg, root=tmp_path / "b", progress=False)
    for sub in ("tokenizer/tokenizer.json", "data/sft.jsonl", "policy/model.safetensors", "rm/model.safetensors"):
        assert _digest(a.root / sub) == _digest(b.root / sub), sub
    # the policy is an ordinary HF checkpoint whose chat template renders the reflection turns
    tok = load_tokenizer(a.policy)
    model = load_causal_lm(a.policy)
    assert model.config.vocab_size >= len(tok)
    text = render_chat(tok, [{"role": "user", "content": "Name three fruits."}, {"role": "assistant", "content": "a."},
                             {"role": "user", "content": FEEDBACK_TURN}], add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n") and FEEDBACK_TURN in text
