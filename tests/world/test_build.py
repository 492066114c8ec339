"""`world build` at a micro size: artefacts, the cache, determinism (same seed -> identical weights), the gate
table in report.json, and the gates' failure path (exit non-zero naming the gate unless --allow-weak)."""

import dataclasses
import hashlib
import json

import pytest

from prs_jax.cli import main
from prs_jax.models import load_causal_lm, load_tokenizer
from prs_jax.models.tokenizer import render_chat
from prs_jax.world.build import build_world, preset, world_key
from prs_jax.world.corpus import FEEDBACK_TURN
from prs_jax.world.gates import GateConfig, GateError
from prs_jax.world.task import CATEGORIES


def _micro(**kw):
    return preset("smoke", train_prompts=40, heldout_prompts=6, curriculum_prompts=10, curriculum_conversations=16,
                  sft_conversations=48, sft_eval_conversations=8, rm_pairs=32, rm_policy_prompts=4, rm_eval_pairs=16,
                  curriculum_steps=1, sft_steps=3, sft_batch_size=8, rm_steps=2, rm_batch_size=8,
                  gates=GateConfig(prompts=4, samples=2, vs_samples=2, vs_lists=1, max_new_tokens=12,
                                   critique_max_new_tokens=12, enforce=False), **kw)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """One micro world per module: (config, built world, its root directory)."""
    root = tmp_path_factory.mktemp("micro")
    cfg = _micro()
    return cfg, build_world(cfg, root=root / "a", progress=False), root


def test_build_cache_determinism_and_gates(micro):
    cfg, a, tmp_path = micro
    for sub in ("policy/config.json", "policy/model.safetensors", "rm/config.json", "tokenizer/tokenizer.json",
                "data/sft.jsonl", "data/sft_curriculum.jsonl", "data/rm_train.jsonl", "data/heldout_prompts.jsonl",
                "report.json"):
        assert (a.root / sub).is_file(), sub
    assert a.root.name == f"world-{world_key(cfg)}"
    report = json.loads((a.root / "report.json").read_text())
    assert 0.0 <= report["rm_heldout_accuracy"] <= 1.0 and report["timings"]["total_s"] > 0
    assert sum(report["loss_share"].values()) == pytest.approx(1.0)
    gates = {g["gate"]: g for g in report["gates"]["rows"]}
    assert {"critique_teacher", "critique_own", "refine_true", "refine_self", "critique_vs_none", "rm_own_accuracy",
            "vs_pearson", "vs_kl"} <= set(gates)
    assert any(name.startswith("lift:") for name in gates) and any(name.startswith("rm_auc:") for name in gates)
    assert len(a.heldout()) == 6 and all(r["preference"] for r in a.heldout())
    # the cache: the same config is reused, a different one gets its own directory
    again = build_world(cfg, root=tmp_path / "a", progress=False)
    assert again.root == a.root and again.report == a.report
    assert world_key(_micro(seed=1)) != world_key(cfg)
    # determinism: an independent build with the same seed gives the same tokenizer, data and weights
    b = build_world(cfg, root=tmp_path / "b", progress=False)
    for sub in ("tokenizer/tokenizer.json", "data/sft.jsonl", "data/rm_train.jsonl", "policy/model.safetensors",
                "rm/model.safetensors"):
        assert _digest(a.root / sub) == _digest(b.root / sub), sub
    # the policy is an ordinary HF checkpoint whose chat template renders the reflection turns
    tok = load_tokenizer(a.policy)
    model = load_causal_lm(a.policy)
    assert model.config.vocab_size >= len(tok)
    text = render_chat(tok, [{"role": "user", "content": "Name three fruits."}, {"role": "assistant", "content": "a."},
                             {"role": "user", "content": FEEDBACK_TURN}], add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n") and FEEDBACK_TURN in text
    # word-level: every item, plain or capitalised, after a space is one known token; text round-trips
    for item in (i for items in CATEGORIES.values() for i in items):
        for w in (f" {item}", f" {item.capitalize()}"):
            ids = tok(w, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and ids[0] != tok.unk_token_id, w
    s = "Here you go: 1. Apple 2. Mango.\n- put plum first"
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s

    # the failure path on the cached build: with its gates enforced it fails naming them; --allow-weak passes
    strict = dataclasses.replace(cfg, gates=dataclasses.replace(cfg.gates, enforce=True))
    assert world_key(strict) == world_key(cfg)  # enforcement does not change what is built
    with pytest.raises(GateError, match=r"failed \d+ skill gate\(s\): .*critique_teacher"):
        build_world(strict, root=tmp_path / "a", progress=False)
    assert build_world(strict, root=tmp_path / "a", progress=False, allow_weak=True).report["gates"]


def test_interrupted_build_resumes_and_stale_gates_are_remeasured(micro, monkeypatch):
    """A build killed after its SFT resumes at the RM (the SFT is not run again) and gives the same RM weights; a
    cached build measured by another gate config is re-measured without retraining."""
    import shutil

    import prs_jax.world.build as wb
    from prs_jax.world.build import gates_key

    cfg, a, tmp_path = micro
    root = tmp_path / "resume"
    shutil.copytree(a.root, root / a.root.name)
    killed = root / a.root.name
    (killed / "report.json").unlink()
    for phase in ("policy_samples", "rm"):
        (killed / ".phases" / f"{phase}.json").unlink()
    shutil.rmtree(killed / "rm")
    shutil.rmtree(killed / "runs" / "rm")

    def no_sft(*args, **kwargs):
        raise AssertionError("a finished SFT phase ran again")

    monkeypatch.setattr(wb, "_sft", no_sft)
    resumed = build_world(cfg, root=root, progress=False)
    assert resumed.root == killed
    assert _digest(killed / "rm" / "model.safetensors") == _digest(a.root / "rm" / "model.safetensors")
    assert resumed.report["gates_key"] == gates_key(cfg)

    other = dataclasses.replace(cfg, gates=dataclasses.replace(cfg.gates, samples=3))
    assert world_key(other) == world_key(cfg) and gates_key(other) != gates_key(cfg)
    policy = _digest(killed / "policy" / "model.safetensors")
    again = build_world(other, root=root, progress=False)
    assert again.root == killed and again.report["gates_key"] == gates_key(other)
    assert json.loads((killed / "report.json").read_text())["gates_key"] == gates_key(other)
    assert _digest(killed / "policy" / "model.safetensors") == policy


def test_gates_give_every_kv_page_back(micro, monkeypatch):
    """The gates release every tree they measure: 256 prompts x 8 samples x three refinement arms once exhausted
    the default KV pool when the measured nodes kept their pages."""
    import prs_jax.world.gates as g

    engines = []
    original = g._engine

    def spy(*args, **kwargs):
        engine, tok = original(*args, **kwargs)
        engines.append(engine)
        return engine, tok

    monkeypatch.setattr(g, "_engine", spy)
    cfg, a, _ = micro
    g.measure_gates(a, cfg.gates)
    g.policy_pairs(a.policy, a.world(), [g._prompt_of(r) for r in a.heldout()], 3, 1, seed=0)
    assert len(engines) == 2
    for engine in engines:
        stats = engine.kv_stats()
        assert stats["pages_used"] == 0 and stats["pages_peak"] > 0, stats


def test_teacher_drafts_are_critiqued_in_the_trained_conversation(micro):
    """The critique gate on teacher drafts feeds exactly the rendered [user, draft, feedback request] chat."""
    from prs_jax.models.tokenizer import encode_chat
    from prs_jax.strategies.templates import require_turn_text
    from prs_jax.world.gates import answered_prompt

    _, a, _ = micro
    tok = load_tokenizer(a.policy)
    for draft in ("Here you go: apple, pear.", "1. Apple 2. Pear. Thanks for asking!"):
        user = "Name two fruits.\n\nPut pear first."
        got = answered_prompt(tok, user, draft) + list(
            tok(require_turn_text(tok, FEEDBACK_TURN), add_special_tokens=False)["input_ids"])
        want = encode_chat(tok, [{"role": "user", "content": user}, {"role": "assistant", "content": draft},
                                 {"role": "user", "content": FEEDBACK_TURN}])
        assert got == want


def test_world_config_rejects_nonsense():
    with pytest.raises(ValueError, match="sft_steps must be positive"):
        preset("smoke", sft_steps=-1)
    with pytest.raises(ValueError, match="train_prompts must be positive"):
        preset("smoke", train_prompts=0)
    with pytest.raises(ValueError, match="sft_lr"):
        preset("smoke", sft_lr=-1.0)


def test_world_build_cli_exit_code_names_the_gate(tmp_path, capsys):
    args = ["world", "build", "--preset", "smoke", "--root", str(tmp_path), "train_prompts=40", "heldout_prompts=6",
            "curriculum_prompts=10", "curriculum_conversations=16", "sft_conversations=48",
            "sft_eval_conversations=8", "rm_pairs=32", "rm_policy_prompts=4", "rm_eval_pairs=16",
            "curriculum_steps=1", "sft_steps=2", "sft_batch_size=8", "rm_steps=1", "rm_batch_size=8",
            "gates.prompts=3", "gates.samples=2", "gates.vs_samples=2", "gates.max_new_tokens=8",
            "gates.critique_max_new_tokens=8", "gates.vs_lists=1", "gates.enforce=true"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "skill gate" in err and "--allow-weak" in err and "Traceback" not in err
    assert main([*args, "--allow-weak"]) == 0
    assert "gates_failed" in capsys.readouterr().out


def test_labelers_are_separate_models_with_gates(micro):
    from prs_jax.models import load_causal_lm
    from prs_jax.world.labelers import LabelerBuildConfig, LabelerSize, build_labelers

    _, built, _ = micro
    lcfg = LabelerBuildConfig(sizes=(LabelerSize("small", 32, 64, 1), LabelerSize("large", 48, 96, 1)),
                              conversations=64, steps=2, batch_size=8, gate_pairs=4)
    report = build_labelers(built, lcfg, progress=False)
    assert set(report["paths"]) == {"small", "large"} and report["gated"] == "large"
    sizes = {name: load_causal_lm(path).config.hidden_size for name, path in report["paths"].items()}
    assert sizes == {"small": 32, "large": 48}  # not the policy (hidden 64)
    gates = {g["gate"] for g in report["gates"]["rows"]}
    assert gates == {"labeler_teacher_accuracy", "labeler_policy_accuracy", "labeler_position_bias"}
    assert build_labelers(built, lcfg, progress=False) == report  # cached


def test_critique_breakdown_counts_recall_false_alarms_and_wrong_items():
    from prs_jax.world.gates import critique_breakdown

    true = [["off:gold", "first:judo"], ["thanks"], []]
    got = [["first:deer"], ["thanks", "numbered"], ["exclude:cat"]]
    b = critique_breakdown(true, got)
    assert b["off"] == {"true": 1, "found": 0, "false_alarms": 0, "wrong_item": 0, "recall": 0.0}
    assert b["first"] == {"true": 1, "found": 0, "false_alarms": 1, "wrong_item": 1, "recall": 0.0}
    assert b["thanks"]["recall"] == 1.0 and b["numbered"]["false_alarms"] == 1 and b["exclude"]["false_alarms"] == 1


def test_vs_gate_drops_lists_that_are_not_a_distribution():
    from prs_jax.world.gates import _is_distribution, _parse_vs

    ok = _parse_vs("- wolf. (50%)\n- fox. (30%)\n- owl. (21%)")
    assert ok and _is_distribution([v for _, v in ok])
    garbled = _parse_vs("- wolf. (830%)\n- fox. (30%)")
    assert garbled and not _is_distribution([v for _, v in garbled])
    assert not _is_distribution([0.2, 0.2])  # sums to 0.4
