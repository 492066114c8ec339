"""`prs-jax label CONFIG`: AI soft labels for a file of response pairs, written as restartable JSONL.

Each output row is a soft-label preference pair in TRL's convention, ready for `prs-jax train rm` with
`loss.soft_labels=true`: `prompt`, `chosen` (response A), `rejected` (response B), `p_chosen` = P(A); plus
`p_a`, `p_b`, the raw distributions over positions of both orders (`q_ab`, `q_ba`), rationales and their
distributions with chain of thought, the human label when known, and `labeler` (a hash of the labeler set-up).

Restart: rows are appended one batch at a time with a single write + fsync; a rerun cuts a torn last line and
skips every id already written (the same helpers as `prs-jax generate`), so nothing is lost or duplicated.
Sampled rationales (self-consistency) are seeded by the batch's ids, so a resumed run samples what the
uninterrupted run would have (for the same batch size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from tqdm import tqdm

from prs_jax.config import check_ranges, to_dict
from prs_jax.data.io import iter_rows
from prs_jax.data.pairs import prompt_and_responses
from prs_jax.data.lock import check_output_file, output_lock
from prs_jax.data.stamp import check_stamp, stamp_path
from prs_jax.errors import ConfigError, DataError, StampError
from prs_jax.feedback.labeler import AILabeler, LabelerConfig
from prs_jax.feedback.metrics import LabelSummary, summarize
from prs_jax.data.io import append_rows, done_ids, write_text_atomic
from prs_jax.models.window import check_fits, window_of


@dataclasses.dataclass(frozen=True)
class LabelRunConfig:
    """A labelling run: the labeler checkpoint, the pairs and their columns, the output, the labeler set-up."""

    model: str = ""
    pairs: str = ""
    split: str | None = None
    prompt_column: str = "prompt"
    a_column: str | None = None  # None: "chosen" if the rows have it, else "response_a"
    b_column: str | None = None  # None: "rejected" if the rows have it, else "response_b"
    id_column: str = "id"
    human_label_column: str = "label"  # 0 / 1 or "a" / "b": which response a human preferred
    chosen_is_human: bool = True  # with chosen/rejected columns (and no label column) the human preferred A
    max_pairs: int | None = None
    out: str = "runs/label/labels.jsonl"
    batch_size: int = 8
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    labeler: LabelerConfig = dataclasses.field(default_factory=LabelerConfig)

    def __post_init__(self) -> None:
        check_ranges(self, "", {"batch_size": ">= 1", "max_pairs": ">= 1"})


@dataclasses.dataclass(frozen=True)
class PairRow:
    """One input pair, validated: id, prompt, responses A and B (text or messages), human label, source."""

    id: str
    prompt: Any
    a: Any
    b: Any
    human: str | None
    where: str


def _columns(cfg: LabelRunConfig, first: dict[str, Any], where: str) -> tuple[str, str]:
    if cfg.a_column and cfg.b_column:
        return cfg.a_column, cfg.b_column
    for a, b in (("chosen", "rejected"), ("response_a", "response_b")):
        if a in first and b in first:
            return cfg.a_column or a, cfg.b_column or b
    raise DataError(f"{where}: no response columns found (the row has {sorted(first)}); expected chosen/rejected "
                    "or response_a/response_b, or set a_column and b_column.")


def _human(cfg: LabelRunConfig, row: dict[str, Any], a_col: str, where: str) -> str | None:
    value = row.get(cfg.human_label_column)
    if value is None:
        return "a" if cfg.chosen_is_human and a_col == "chosen" else None
    if isinstance(value, bool):
        raise DataError(f"{where}: column {cfg.human_label_column!r} must be 0/1 or 'a'/'b', got {value!r}.")
    if isinstance(value, int) and value in (0, 1):
        return "ab"[value]
    if isinstance(value, str) and value.strip().lower() in ("a", "b"):
        return value.strip().lower()
    raise DataError(f"{where}: column {cfg.human_label_column!r} must be 0 / 1 (index of the preferred response) "
                    f"or 'a' / 'b', got {value!r}.")


def read_pairs(cfg: LabelRunConfig) -> list[PairRow]:
    """Validated pairs of `cfg.pairs` (JSONL / JSON / Parquet / datasets) with stable, unique ids."""
    out: list[PairRow] = []
    seen: dict[str, int] = {}
    cols: tuple[str, str] | None = None
    for r in iter_rows(cfg.pairs, cfg.split):
        if cfg.max_pairs is not None and len(out) >= cfg.max_pairs:
            break
        data = dict(r.data)
        if cols is None:
            cols = _columns(cfg, data, r.where)
        if cfg.prompt_column != "prompt":
            data["prompt"] = data.pop(cfg.prompt_column, None)
        prompt, (a, b) = prompt_and_responses(data, r.where, cols)
        pid = data.get(cfg.id_column)
        if pid is None:  # content hash: the same pair gets the same id in every run
            pid = "sha1:" + hashlib.sha1(json.dumps([prompt, a, b], sort_keys=True).encode()).hexdigest()[:16]
        pid = str(pid)
        seen[pid] = seen.get(pid, 0) + 1
        if seen[pid] > 1:
            pid = f"{pid}#{seen[pid]}"
        out.append(PairRow(pid, prompt, a, b, _human(cfg, r.data, cols[0], r.where), r.where))
    if not out:
        raise DataError(f"{cfg.pairs}: no pairs.")
    return out


def _prompt_files(cfg: LabelRunConfig) -> dict[str, str]:
    p = cfg.labeler.prompt
    files = {}
    texts = [v[1:] for v in (p.preamble, p.ending, p.cot_instruction) if v and v.startswith("@")]
    for name in texts + ([p.exemplars.lstrip("@")] if p.exemplars else []):
        if Path(name).is_file():
            files[name] = Path(name).read_text(encoding="utf-8")
    return files


def labeler_hash(cfg: LabelRunConfig) -> str:
    """A short hash of everything that decides the labels: model, labeler config, texts of @files."""
    blob = json.dumps({"model": cfg.model, "labeler": to_dict(cfg.labeler), "files": _prompt_files(cfg)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def row_config(cfg: LabelRunConfig) -> dict[str, Any]:
    """The part of the config that decides the rows (the output's stamp): everything but the output path,
    batch size, pair limit and the labeler's bucketing, plus the texts of the @files the labeler prompt reads."""
    d = to_dict(cfg)
    for key in ("out", "batch_size", "max_pairs"):
        d.pop(key)
    for key in ("max_rows", "min_row_bucket", "min_prefix_bucket", "attention_impl"):
        d["labeler"].pop(key)
    return {**d, "prompt_files": _prompt_files(cfg)}


def _first_row(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                return json.loads(line)
    return None


def read_labels(path: str | Path) -> list[dict[str, Any]]:
    """The complete rows of a labels file (a torn last line is ignored)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def run_label(cfg: LabelRunConfig, console: Console | None = None,
              on_batch: Callable[[int], None] | None = None, labeler: AILabeler | None = None
              ) -> tuple[Path, LabelSummary]:
    """Label every pair not yet in `cfg.out`; returns the output path and the summary of the whole file.
    `on_batch(rows written so far)` runs after each batch is on disk; `labeler` reuses a loaded labeler."""
    console = console or Console()
    if not cfg.model or not cfg.pairs:
        raise ConfigError("label: `model` (labeler checkpoint dir) and `pairs` (data source) are required.")
    out = check_output_file(cfg.out)
    pairs = read_pairs(cfg)
    tag = labeler_hash(cfg)
    with output_lock(out):
        done = done_ids(out)
        if done and not stamp_path(out).exists():  # an output of an older version: its rows carry the tag only
            first = _first_row(out)
            if first is not None and first.get("labeler") != tag:
                raise StampError(f"{out}: holds labels from another labeler set-up (labeler "
                                 f"{first.get('labeler')!r}, this run {tag!r}); write to another `out` or delete "
                                 "the file to start over.")
        check_stamp(stamp_path(out), row_config(cfg), resuming=bool(done), what=str(out))
        todo = [p for p in pairs if p.id not in done]
        console.print(f"label: {len(pairs)} pairs, {len(pairs) - len(todo)} already in {out}, {len(todo)} to go "
                      f"(labeler {tag})", markup=False)
        write_text_atomic(out.parent / f"{out.stem}.config.json", json.dumps(to_dict(cfg), indent=2))
        if todo:
            labeler = labeler or AILabeler.from_pretrained(cfg.model, cfg.labeler, dtype=cfg.dtype)
            window = window_of(labeler.model)
            for p in todo:
                check_fits(labeler.input_tokens(p.prompt, p.a, p.b), window, what=f"pair {p.id!r} ({p.where})",
                           model="labeler", fix="shorten or drop the pair, lower labeler.cot_max_new_tokens, or use "
                           "a longer-context labeler.")
            written = len(pairs) - len(todo)
            with tqdm(total=len(pairs), initial=written, desc="label", unit="pair") as bar:
                for start in range(0, len(todo), cfg.batch_size):
                    batch = todo[start:start + cfg.batch_size]
                    labels = labeler.label([p.prompt for p in batch], [p.a for p in batch], [p.b for p in batch],
                                           seed=cfg.seed)  # sampled rationales are keyed by each pair's tokens
                    rows = [{"id": p.id, "prompt": p.prompt, "chosen": p.a, "rejected": p.b, "p_chosen": lab.p_a,
                             **lab.to_dict(), "human_label": p.human, "labeler": tag}
                            for p, lab in zip(batch, labels)]
                    append_rows(out, rows)
                    written += len(batch)
                    bar.update(len(batch))
                    bar.set_postfix(p_a=f"{sum(lab.p_a for lab in labels) / len(labels):.3f}",
                                    compilations=labeler.compilations)
                    if on_batch is not None:
                        on_batch(written)
        summary = summarize(read_labels(out))
        write_text_atomic(out.parent / f"{out.stem}.summary.json", json.dumps(summary.to_dict(), indent=2))
    return out, summary


def format_summary(s: LabelSummary) -> str:
    """One human-readable line per metric."""
    lines = [f"pairs labelled: {s.n} (mean P(A) {s.mean_p_a:.3f}, ties {s.ties})"]
    if s.n_human:
        lines.append(f"alignment with human labels: {s.alignment:.3f} over {s.n_human} pairs")
    if s.n_both_orders:
        lines.append(f"position-bias rate (same position wins in both orders): {s.position_bias:.3f} over "
                     f"{s.n_both_orders} pairs")
    return "\n".join(lines)
