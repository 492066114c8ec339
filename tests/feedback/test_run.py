"""`prs-jax label`: an interrupted run (plus a torn last line) resumes and ends with exactly the rows of an
uninterrupted run; the CLI end to end on the tiny checkpoint with experiments/configs/label_tiny.yaml, its rows
readable as soft-label reward-model pairs; input column conventions and human labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prs_jax.cli import main
from prs_jax.config import load_config
from prs_jax.errors import DataError
from prs_jax.feedback.labeler import AILabeler
from prs_jax.feedback.run import LabelRunConfig, read_pairs, run_label

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "experiments" / "data" / "tiny_pairs.jsonl"
CONFIG = ROOT / "experiments" / "configs" / "label_tiny.yaml"
FAST = ["labeler.min_row_bucket=128", "batch_size=2"]  # the shapes of test_labeler.py: no new compilation


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint("llama", max_position_embeddings=2048)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class Stop(Exception):
    pass


def test_interrupted_labelling_resumes_without_loss_or_duplicates(ckpt, tmp_path):
    def cfg(out):
        return load_config(LabelRunConfig, CONFIG, [f"model={ckpt}", f"out={out}", "max_pairs=6",
                                                    *FAST])

    whole = cfg(tmp_path / "whole.jsonl")
    labeler = AILabeler.from_pretrained(str(ckpt), whole.labeler)
    run_label(whole, labeler=labeler)
    want = _rows(tmp_path / "whole.jsonl")
    assert [r["id"] for r in want] == [p.id for p in read_pairs(whole)] and len(want) == 6

    part = cfg(tmp_path / "part.jsonl")

    def stop_after_two_batches(written):
        if written >= 4:
            raise Stop

    with pytest.raises(Stop):
        run_label(part, labeler=labeler, on_batch=stop_after_two_batches)
    written = _rows(tmp_path / "part.jsonl")
    assert len(written) == 4
    with open(tmp_path / "part.jsonl", "a") as fh:  # a kill in the middle of a write leaves a torn line
        fh.write('{"id": "' + want[4]["id"] + '", "p_a": 0.')
    _, summary = run_label(part, labeler=labeler)
    got = _rows(tmp_path / "part.jsonl")
    assert got == want  # same rows, same order, same numbers; nothing lost or duplicated
    assert summary.n == 6 and summary.n_human == 6 and summary.n_both_orders == 6

    other = load_config(LabelRunConfig, CONFIG, [f"model={ckpt}", f"out={tmp_path / 'part.jsonl'}",
                                                 "labeler.prompt.variant=detailed"])
    with pytest.raises(DataError, match=r"differing keys: labeler.prompt.variant \("):
        run_label(other, labeler=labeler)


def test_cli_label_end_to_end(ckpt, tmp_path, capsys):
    from prs_jax.data.pairs import load_pairs, tokenize_pairs
    from prs_jax.models import load_tokenizer

    out = tmp_path / "labels.jsonl"
    assert main(["label", str(CONFIG), f"model={ckpt}", f"out={out}", "max_pairs=4", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "alignment with human labels" in printed and "position-bias rate" in printed
    rows = _rows(out)
    assert len(rows) == 4
    for r in rows:
        assert r["p_chosen"] == r["p_a"] and r["p_a"] + r["p_b"] == pytest.approx(1.0)
        assert len(r["q_ab"]) == len(r["q_ba"]) == 2 and r["human_label"] == "a" and r["labeler"]
    summary = json.loads((tmp_path / "labels.summary.json").read_text())
    assert summary["n"] == 4 and 0.0 <= summary["alignment"] <= 1.0
    # the rows are soft-label reward-model data as `prs-jax train rm` reads them
    pairs = load_pairs(out)
    assert [p.p_chosen for p in pairs] == [r["p_a"] for r in rows]
    examples, report = tokenize_pairs(pairs, load_tokenizer(ckpt))
    assert report.kept == 4 and all(e.p_chosen is not None for e in examples)


def test_input_columns_ids_and_human_labels(tmp_path):
    src = tmp_path / "ab.jsonl"
    rows = [{"prompt": "q1", "response_a": "x", "response_b": "y", "label": 1},
            {"prompt": "q2", "response_a": "x", "response_b": "y", "label": "A"},
            {"prompt": "q1", "response_a": "x", "response_b": "y"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = read_pairs(LabelRunConfig(model="m", pairs=str(src)))
    assert [p.human for p in pairs] == ["b", "a", None]
    assert pairs[0].id.startswith("sha1:") and pairs[2].id == pairs[0].id + "#2"  # same content, unique ids
    assert read_pairs(LabelRunConfig(model="m", pairs=str(PAIRS), max_pairs=2))[0].human == "a"
    src.write_text(json.dumps({"prompt": "q", "response_a": "x", "response_b": "y", "label": 3}) + "\n")
    with pytest.raises(DataError, match=r"ab.jsonl:1: column 'label' must be 0 / 1"):
        read_pairs(LabelRunConfig(model="m", pairs=str(src)))
    src.write_text(json.dumps({"prompt": "q", "a": "x"}) + "\n")
    with pytest.raises(DataError, match="no response columns"):
        read_pairs(LabelRunConfig(model="m", pairs=str(src)))
