"""Resume guards of the trainer: metrics.jsonl after a crash and resume holds each step once (and matches an
uninterrupted run), a changed loss / optimizer is refused unless force_resume, the run directory is locked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prs_jax.data.lock import OutputLock
from prs_jax.errors import LockError
from prs_jax.models import load_causal_lm
from prs_jax.data.batches import PairBatch
from prs_jax.data.pairs import TokenizedPair, collate_pairs
from prs_jax.train.objectives import PreferenceLoss
from prs_jax.train.trainer import (
    ArraySource,
    OptimConfig,
    Trainer,
    TrainerConfig,
    TrainingError,
    resume_config,
    trim_metrics,
)

def pair_arrays(n: int, seed: int = 0) -> PairBatch:
    """Separable preference pairs (as in test_trainer): chosen repeat token 40, rejected token 90."""
    rng = np.random.default_rng(seed)
    pairs = [TokenizedPair(rng.integers(100, 400, size=8).astype(np.int32),
                           np.full(int(rng.integers(4, 10)), 40, np.int32),
                           np.full(int(rng.integers(4, 10)), 90, np.int32)) for _ in range(n)]
    return collate_pairs(pairs, multiple=8)


def cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), steps=6, batch_size=4, progress=False, tensorboard=False,
                async_checkpoint=False)
    base.update(kw)
    return TrainerConfig(**base)


class Crash(Exception):
    pass


class CrashAt(ArraySource):
    """An ArraySource that raises on its `at`-th collate (a crash in the middle of a run)."""

    def __init__(self, arrays, static_fn, at: int):
        super().__init__(arrays, static_fn)
        self.at, self.calls = at, 0

    def collate(self, indices):
        self.calls += 1
        if self.calls == self.at:
            raise Crash
        return super().collate(indices)


def _trainer(llama_dir, run_dir, lr=1e-3, loss="ipo", **kw):
    optim = OptimConfig(lr=lr)
    return Trainer(load_causal_lm(llama_dir), PreferenceLoss(loss, beta=0.3), cfg(run_dir, **kw), optim,
                   frozen={"ref": load_causal_lm(llama_dir)},
                   run_config={"loss": {"name": loss}, "optim": {"lr": lr}, "trainer": {"steps": kw.get("steps")}})


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]


def test_metrics_after_crash_and_resume_hold_each_step_once(llama_dir, tmp_path, monkeypatch):
    import types

    from tensorboardX import event_file_writer

    # every event file named in the same second (a fast resume): a resumed run must not truncate the killed one's
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.7e9))
    arrays = pair_arrays(n=10)
    _trainer(llama_dir, tmp_path / "a", steps=6, save_every=2, tensorboard=True).fit(ArraySource(arrays))
    with pytest.raises(Crash):  # steps 1-3 logged, checkpoint at 2, crash while building step 4's batch
        _trainer(llama_dir, tmp_path / "b", steps=6, save_every=2, tensorboard=True).fit(
            CrashAt(arrays, None, at=4))
    assert [r["step"] for r in _rows(tmp_path / "b")] == [1, 2, 3]
    with open(tmp_path / "b" / "run" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "split": "tr')  # and a torn line from a kill mid-write
    _trainer(llama_dir, tmp_path / "b", steps=6, save_every=2, tensorboard=True).fit(ArraySource(arrays))
    resumed = _rows(tmp_path / "b")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in _rows(tmp_path / "a")]  # bitwise on CPU
    assert _tensorboard_steps(tmp_path / "b" / "run" / "tensorboard", "train/loss") == [1, 2, 3, 4, 5, 6]


def _tensorboard_steps(logdir, tag):
    """Steps of scalar `tag` as TensorBoard shows them: event files read in order (TFRecord framing), and a
    SessionLog START at step s (the writer's purge_step) hides the events at and after s written before it."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    kept: list[int] = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):  # TensorBoard reads them in name order
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                kept = [s for s in kept if s < event.step]
            elif event.HasField("summary"):
                kept += [event.step for v in event.summary.value if v.tag == tag]
    return kept


def test_changed_optimizer_or_loss_is_refused_unless_forced(llama_dir, tmp_path):
    src = ArraySource(pair_arrays(n=8))
    _trainer(llama_dir, tmp_path, steps=2).fit(src)
    with pytest.raises(TrainingError, match=r"differing keys: optim.lr \(optim.lr: 0.001 -> 0.002\).*--force-resume"):
        _trainer(llama_dir, tmp_path, lr=2e-3, steps=4).fit(src)
    with pytest.raises(TrainingError, match="differing keys: loss.name"):
        _trainer(llama_dir, tmp_path, loss="sigmoid", steps=4).fit(src)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]  # the refused runs logged nothing
    _trainer(llama_dir, tmp_path, steps=3).fit(src)  # more steps: the same run, resumed
    tr = _trainer(llama_dir, tmp_path, lr=2e-3, steps=4, force_resume=True)
    tr.fit(src)
    assert tr.step == 4 and [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]


def test_run_directory_is_locked_while_training(llama_dir, tmp_path):
    src = ArraySource(pair_arrays(n=8))
    (tmp_path / "run").mkdir()
    with OutputLock(tmp_path / "run"):
        with pytest.raises(LockError, match="another run is writing .*run"):
            _trainer(llama_dir, tmp_path, steps=1).fit(src)
    _trainer(llama_dir, tmp_path, steps=1).fit(src)
    OutputLock(tmp_path / "run").acquire().release()  # released when the run ended


def test_resume_config_ignores_loop_settings():
    a = {"task": "dpo", "loss": {"name": "ipo"}, "trainer": {"steps": 3, "seed": 0, "batch_size": 4},
         "export_dir": "x", "value": {"head": "shared", "export_dir": "y"}}
    b = {"task": "dpo", "loss": {"name": "ipo"}, "trainer": {"steps": 9, "seed": 0, "batch_size": 8},
         "export_dir": "z", "value": {"head": "shared", "export_dir": None}}
    assert resume_config(a) == resume_config(b)
    assert resume_config(a) != resume_config({**b, "trainer": {"seed": 1}})


def test_trim_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "split": sp}) + "\n" for s, sp in
                            [(1, "train"), (2, "train"), (2, "eval"), (3, "train")]) + '{"step": 4')
    trim_metrics(path, 2)
    assert [(r["step"], r["split"]) for r in map(json.loads, path.read_text().splitlines())] == [
        (1, "train"), (2, "train"), (2, "eval")]
    trim_metrics(path, 0)
    assert path.read_text() == ""
    trim_metrics(tmp_path / "none.jsonl", 3)  # no file: nothing to do


def test_resume_config_fills_loss_keys_added_later():
    """A checkpoint written before loss.delta_reference / loss.ipo_delta_units existed was trained with their
    defaults: the resume guard must not refuse it."""
    from prs_jax.data.stamp import diff_keys
    from prs_jax.train.trainer import resume_config

    old = {"task": "dpo", "loss": {"name": "sr_dpo", "beta": 0.1}, "trainer": {"seed": 0}}
    new = {"task": "dpo", "loss": {"name": "sr_dpo", "beta": 0.1, "delta_reference": "augmented",
                                   "ipo_delta_units": "reward"}, "trainer": {"seed": 0}}
    assert diff_keys(resume_config(old), resume_config(new)) == []
    changed = {**new, "loss": {**new["loss"], "delta_reference": "plain"}}
    assert diff_keys(resume_config(old), resume_config(changed)) == ["loss.delta_reference"]
