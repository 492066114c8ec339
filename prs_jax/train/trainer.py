"""One training loop for SFT, reward models, the DPO family and A2C.

A task plugs in a pure loss `loss_fn(model, batch, static) -> (loss, metrics)` and a `BatchSource` (`fit`),
or builds each batch itself and calls `start`, `train_on(batch, static)` per step and `close` (an RL outer
loop that samples between steps); the loop owns the rest: optax chain (clip -> adamw/rmsprop, warmup +
schedule), gradient accumulation (a scan over micro-batches), optional bf16 compute with fp32 master weights,
sharding over a (data, fsdp, tensor) mesh, Orbax checkpoints (async, keep-k, best-k by an eval metric) with
exact resume (step, optimizer, data order), evaluation every k steps, metrics to JSONL and TensorBoard, a
progress bar, and a guard that stops on a non-finite loss without overwriting good checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from prs_jax.config import check_ranges
from prs_jax.data.io import write_text_atomic
from prs_jax.data.lock import OutputLock
from prs_jax.data.stamp import describe_diff, diff_keys
from prs_jax.errors import ConfigError, PrsJaxError
from prs_jax.models.sharding import LAYER_AXIS, MeshConfig

Metrics = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, dict[str, jax.Array], Any], tuple[jax.Array, Metrics]]


class TrainingError(PrsJaxError):
    """Training cannot go on (non-finite loss, incompatible checkpoint)."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer: gradient clipping, AdamW or RMSprop, linear warmup then constant / cosine / linear decay."""

    name: Literal["adamw", "rmsprop", "sgd"] = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_ranges(self, "optim", {"lr": "> 0", "weight_decay": ">= 0", "b1": "in [0, 1)", "b2": "in [0, 1)",
                                     "eps": "> 0", "clip_norm": "> 0", "warmup_steps": ">= 0",
                                     "min_lr_ratio": "in [0, 1]"})


def decay_mask(params: Any) -> Any:
    """True for the leaves AdamW decays: weights of rank >= 2 (matrices, embeddings, conv kernels); norms' scales
    and biases (rank <= 1) are not decayed, the usual practice."""
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def param_decay_mask(state: nnx.State) -> nnx.State:
    """`decay_mask` for parameters that carry logical axes: the rank counts the weight's own axes only, so the
    stacked layers of a `scan_layers` model (leading axis named `LAYER_AXIS`) are decayed like per-layer ones:
    a stacked norm scale [L, hidden] or bias is not decayed, a stacked kernel [L, in, out] is."""

    def one(var: nnx.Variable) -> nnx.Variable:
        axes = var.get_metadata().get("logical_axes") or ()
        return var.replace(jnp.ndim(var.get_value()) - sum(a == LAYER_AXIS for a in axes) >= 2)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: OptimConfig, total_steps: int, decay: Any = None) -> optax.GradientTransformation:
    """The optax chain for `cfg` over `total_steps` optimizer steps. AdamW decays the leaves `decay` marks (a
    pytree of bools like the parameters); by default `decay_mask`, rank >= 2 leaves only."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    else:
        after = optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, decay_steps)
    schedule = (optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), after],
                                     [cfg.warmup_steps]) if cfg.warmup_steps else after)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mask=decay_mask if decay is None else decay)
    elif cfg.name == "rmsprop":
        opt = optax.rmsprop(schedule, eps=cfg.eps)
    else:
        opt = optax.sgd(schedule)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    return optax.chain(*parts, opt)


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Loop settings. `batch_size` is examples per optimizer step, split into `grad_accum` micro-batches."""

    out_dir: str = "runs/train"
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 0  # 0: no periodic evaluation
    eval_batches: int = 0  # 0: the whole eval set
    save_every: int = 0  # 0: save only at the end
    keep: int = 2
    best_metric: str | None = None  # e.g. "eval/accuracy": keep the best checkpoints by it
    best_mode: Literal["max", "min"] = "max"
    log_every: int = 1
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    mesh: MeshConfig | None = None
    tensorboard: bool = True
    progress: bool = True
    async_checkpoint: bool = True
    group_by_length: int = 0  # > 0: batches drawn from chunks of this many batches sorted by length (less padding)

    force_resume: bool = False  # resume a run directory even when its loss / optimizer / data config changed

    def __post_init__(self) -> None:
        check_ranges(self, "trainer", {"steps": ">= 1", "batch_size": ">= 1", "grad_accum": ">= 1",
                                       "eval_every": ">= 0", "eval_batches": ">= 0", "save_every": ">= 0",
                                       "keep": ">= 1", "log_every": ">= 1", "group_by_length": ">= 0"})
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"trainer.batch_size {self.batch_size} is not divisible by trainer.grad_accum "
                              f"{self.grad_accum}; make it a multiple.")


class BatchSource(Protocol):
    """Examples addressable by index; `collate` turns indices into fixed-shape arrays plus static info."""

    def __len__(self) -> int: ...

    def collate(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], Any]: ...


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def grouped_permutation(lengths: np.ndarray, seed: int, epoch: int, batch_size: int, group: int) -> np.ndarray:
    """An epoch order whose consecutive batches hold examples of similar length: the epoch's permutation is cut
    into chunks of `group` batches, each chunk sorted by length, then whole batches are shuffled (less padding)."""
    n = len(lengths)
    perm = _epoch_permutation(n, seed, epoch)
    chunk = batch_size * group
    order = np.concatenate([idx[np.argsort(-lengths[idx], kind="stable")]
                            for idx in (perm[c:c + chunk] for c in range(0, n, chunk))])
    nb = n // batch_size
    blocks = order[:nb * batch_size].reshape(nb, batch_size)[np.random.default_rng([seed, epoch, 1]).permutation(nb)]
    return np.concatenate([blocks.reshape(-1), order[nb * batch_size:]])


def data_order(n: int, seed: int, step: int, batch_size: int, lengths: np.ndarray | None = None,
               group: int = 0) -> np.ndarray:
    """Indices for optimizer step `step`: epochs are fresh permutations seeded by (seed, epoch) (length-grouped
    with `group` > 0 and `lengths`). Deterministic, so a resumed run sees exactly the batches an uninterrupted
    run would."""
    start = step * batch_size
    epochs = {(start + j) // n for j in range(batch_size)}
    if group > 0 and lengths is not None:
        if len(lengths) != n:
            raise ValueError(f"data_order: {len(lengths)} lengths for {n} examples.")
        orders = {e: grouped_permutation(np.asarray(lengths), seed, e, batch_size, group) for e in epochs}
    else:
        orders = {e: _epoch_permutation(n, seed, e) for e in epochs}
    return np.array([orders[(start + j) // n][(start + j) % n] for j in range(batch_size)])


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class Trainer:
    """Runs `loss_fn` over a `BatchSource` with optax, orbax and logging; see the module docstring."""

    def __init__(self, model: nnx.Module, loss_fn: LossFn, config: TrainerConfig, optim: OptimConfig,
                 frozen: Mapping[str, nnx.Module] | None = None, run_config: Mapping[str, Any] | None = None):
        self.model = model
        self.loss_fn = loss_fn
        self.config = config
        self.frozen = dict(frozen or {})
        self.out_dir = Path(config.out_dir)
        # the mesh and the configured logical-axis rules; every step is traced and run inside `_scope()`, so
        # the activation constraints (`constrain`) take effect with these rules
        self.mesh_context = config.mesh.context() if config.mesh is not None else None
        self.mesh = self.mesh_context.mesh if self.mesh_context is not None else None
        if self.mesh_context is not None:
            self.mesh_context.shard(model)
            for m in self.frozen.values():
                self.mesh_context.shard(m)
        self.step = 0
        self.run_config = dict(run_config or {})
        # extra JSON saved with every checkpoint (e.g. an outer loop's counters and RNG); `restored_meta` is
        # the metadata of the checkpoint a resume read
        self.checkpoint_meta: dict[str, Any] = {}
        self.restored_meta: dict[str, Any] | None = None
        self._graphdef, params_state, self._rest = nnx.split(model, nnx.Param, ...)
        # Parameters travel as a flat {name: array} dict: plain for optax and for Orbax's checkpoint layout.
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(params_state)
        self._keys = [jax.tree_util.keystr(p) for p, _ in leaves]
        self._params = {k: leaf for k, (_, leaf) in zip(self._keys, leaves)}
        decay = jax.tree.leaves(param_decay_mask(params_state))
        self.tx = make_optimizer(optim, config.steps, decay=dict(zip(self._keys, decay)))
        self._frozen_split = {k: nnx.split(m) for k, m in self.frozen.items()}
        self._train_step = self._scoped(jax.jit(self._train_step_impl, static_argnames=("static",),
                                                donate_argnums=(0, 1)))
        self._eval_step = self._scoped(jax.jit(self._eval_step_impl, static_argnames=("static",)))

    # ---------------------------------------------------------------------------------------- compiled
    def _state(self, params: dict[str, jax.Array]) -> nnx.State:
        return jax.tree.unflatten(self._treedef, [params[k] for k in self._keys])

    def _loss(self, params, rest, frozen_states, batch, static):
        compute = jnp.bfloat16 if self.config.compute_dtype == "bfloat16" else None
        p = _cast_floats(params, compute) if compute is not None else params
        model = nnx.merge(self._graphdef, self._state(p), rest)
        frozen = {k: nnx.merge(self._frozen_split[k][0], s) for k, s in frozen_states.items()}
        if compute is not None:
            frozen = {k: nnx.merge(self._frozen_split[k][0], _cast_floats(s, compute))
                      for k, s in frozen_states.items()}
        loss, metrics = self.loss_fn(model, batch, static, **({"frozen": frozen} if frozen else {}))
        return loss.astype(jnp.float32), metrics

    def _train_step_impl(self, params, opt_state, rest, frozen_states, batch, *, static):
        accum = self.config.grad_accum
        micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def one(carry, mb):
            g_sum, l_sum, m_sum = carry
            (loss, metrics), grads = grad_fn(params, rest, frozen_states, mb, static)
            g_sum = jax.tree.map(jnp.add, g_sum, grads)
            m_sum = jax.tree.map(jnp.add, m_sum, metrics)
            return (g_sum, l_sum + loss, m_sum), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda x: x[0], micro)
        metric_shape = jax.eval_shape(lambda: self._loss(params, rest, frozen_states, first, static)[1])
        m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shape)
        (g_sum, l_sum, m_sum), _ = jax.lax.scan(one, (zeros, jnp.float32(0), m0), micro)
        grads = jax.tree.map(lambda g: g / accum, g_sum)
        updates, new_opt_state = self.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = jax.tree.map(lambda m: m / accum, m_sum)
        metrics["loss"] = l_sum / accum
        metrics["grad_norm"] = optax.tree.norm(grads)
        # params and optimizer state are donated: on a non-finite step return the old ones, so the NaN guard
        # leaves the model holding its last good weights
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state), metrics

    def _eval_step_impl(self, params, rest, frozen_states, batch, valid_b, *, static):
        """Sums over the valid rows of each row's loss and metrics, every row evaluated as a batch of one (a
        vmap: one compiled program, one batched forward), so padding rows add nothing and a row's value does
        not depend on the rows it was batched with."""

        def one(row):
            loss, metrics = self._loss(params, rest, frozen_states, row, static)
            return dict(metrics, loss=loss)

        per_row = jax.vmap(one)(jax.tree.map(lambda x: x[:, None], batch))
        # where, not multiply: a padding row's value is never mixed in, even if it is not finite
        return {k: jnp.sum(jnp.where(valid_b.reshape((-1,) + (1,) * (v.ndim - 1)), v.astype(jnp.float32), 0.0),
                           axis=0) for k, v in per_row.items()}

    # ---------------------------------------------------------------------------------------- plumbing
    def _scope(self) -> contextlib.AbstractContextManager:
        """The mesh context (mesh + rules) the compiled steps are traced and run in; a no-op without a mesh."""
        return self.mesh_context.activate() if self.mesh_context is not None else contextlib.nullcontext()

    def _scoped(self, fn: Callable) -> Callable:
        """`fn` traced and run inside `_scope()`; `.lower(...)` too (for inspecting the compiled program)."""

        def call(*args, **kwargs):
            with self._scope():
                return fn(*args, **kwargs)

        def lower(*args, **kwargs):
            with self._scope():
                return fn.lower(*args, **kwargs)

        call.lower = lower
        return call

    def _device_batch(self, arrays: Any) -> Any:
        """A batch pytree (a dict of arrays or a typed batch from prs_jax.data.batches) on the device(s)."""
        if self.mesh_context is None:
            return jax.tree.map(jnp.asarray, arrays)
        return jax.tree.map(lambda v: jax.device_put(v, self.mesh_context.batch_sharding(np.shape(v))), arrays)

    def _manager(self) -> ocp.CheckpointManager:
        cfg = self.config
        best_fn = None
        if cfg.best_metric:
            key = cfg.best_metric
            best_fn = lambda metrics: float(metrics.get(key, float("nan")))  # noqa: E731
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, best_fn=best_fn, best_mode=cfg.best_mode,
            keep_checkpoints_without_metrics=best_fn is None, enable_async_checkpointing=cfg.async_checkpoint)
        return ocp.CheckpointManager((self.out_dir / "checkpoints").absolute(), options=options)

    def _fingerprint(self) -> dict[str, str]:
        return {k: f"{v.dtype}{list(v.shape)}" for k, v in self._params.items()}

    def _state_tree(self) -> dict[str, Any]:
        return {"params": self._params, "opt_state": self._opt_state_tree}

    def restore(self, manager: ocp.CheckpointManager) -> bool:
        """Restore the latest checkpoint if there is one; returns whether it did. A checkpoint trained with
        another loss / optimizer / model / data config is refused (naming the keys) unless `force_resume`."""
        step = manager.latest_step()
        if step is None:
            return False
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        old = meta.get("run_config")
        if isinstance(old, dict) and not self.config.force_resume:
            keys = diff_keys(resume_config(old), resume_config(self.run_config))
            if keys:
                detail = describe_diff(resume_config(old), resume_config(self.run_config), keys)
                raise TrainingError(
                    f"{self.out_dir}: its checkpoint at step {step} was trained with another config; differing "
                    f"keys: {', '.join(keys)} ({detail}). Use another trainer.out_dir, restore the old values, or "
                    "pass --force-resume (trainer.force_resume=true) to continue from it anyway.")
        mine = self._fingerprint()
        theirs = meta.get("params", {})
        if theirs != mine:
            diff = sorted(set(theirs.items()) ^ set(mine.items()))[:3] if isinstance(theirs, dict) else theirs
            raise TrainingError(f"{manager.directory}: checkpoint at step {step} does not match this model "
                                f"(another architecture or config?); differing parameters: {diff}. Use another "
                                "out_dir or delete the old checkpoints.")
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                              self._state_tree())
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"{manager.directory}: checkpoint at step {step} does not match this model/optimizer "
                                f"(another architecture or config?): {e}") from e
        state = restored["state"]
        self._params = dict(state["params"])
        self._opt_state_tree = state["opt_state"]
        self.step = int(restored["meta"]["step"])
        self.restored_meta = dict(restored["meta"])
        return True

    def start(self) -> bool:
        """Open a run for step-by-step training (`train_on`): optimizer state, resume from the latest checkpoint,
        logs. Returns whether it resumed; `restored_meta` then holds the checkpoint's JSON metadata."""
        cfg = self.config
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise TrainingError(f"{self.out_dir}: is a file; trainer.out_dir must be a directory.") from None
        self._lock = OutputLock(self.out_dir).acquire()
        try:
            self._opt_state_tree = self.tx.init(self._params)
            self._ckpt = self._manager()
            resumed = self.restore(self._ckpt)
            write_text_atomic(self.out_dir / "config.json", json.dumps(self.run_config, indent=2, default=str))
            # the steps logged after the restored checkpoint (before a kill) are logged again by this run
            trim_metrics(self.out_dir / "metrics.jsonl", self.step)
            self._frozen_states = {k: s for k, (_, s) in self._frozen_split.items()}
            self._log_file = open(self.out_dir / "metrics.jsonl", "a")
            self._writer = None
            if cfg.tensorboard:
                from tensorboardX import SummaryWriter

                # purge_step: TensorBoard drops the events at and after it that an earlier, killed run wrote
                # the suffix keeps a resumed run's event file apart: tensorboardX names files by the second and
                # opens them "wb", so a resume within the same second as the killed run truncated its events;
                # the fixed-width clock first keeps TensorBoard's name order the order the runs started
                self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step + 1,
                                             filename_suffix=f".{time.time_ns()}.from_step{self.step}")
        except BaseException:
            self._lock.release()
            raise
        self._t_last, self._tokens_since = time.perf_counter(), 0
        return resumed

    def train_on(self, arrays: Any, static: Any, eval_source: BatchSource | None = None,
                 extra_metrics: Mapping[str, float] | None = None) -> dict[str, float]:
        """One optimizer step on a batch the caller built (after `start`), with the NaN guard, logging (plus
        `extra_metrics`), evaluation and checkpoints on the configured schedule; returns the step's metrics."""
        cfg = self.config
        self._tokens_since += _count_tokens(arrays)
        batch = self._device_batch(arrays)
        new_params, new_opt, metrics = self._train_step(self._params, self._opt_state_tree, self._rest,
                                                        self._frozen_states, batch, static=static)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        # the old buffers were donated; a bad step returned them
        self._params, self._opt_state_tree = new_params, new_opt
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            good = self._ckpt.latest_step()
            raise TrainingError(
                f"non-finite loss {metrics['loss']} at step {self.step + 1}; stopped without saving. The "
                f"last good checkpoint is step {good} in {self._ckpt.directory}." if good is not None else
                f"non-finite loss {metrics['loss']} at step {self.step + 1}; stopped, nothing was saved.")
        self.step += 1
        now = time.perf_counter()
        metrics["tokens_per_s"] = self._tokens_since / max(now - self._t_last, 1e-9)
        metrics.update(extra_metrics or {})
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            self._t_last, self._tokens_since = now, 0
            self._log(self._log_file, self._writer, "train", metrics)
        eval_metrics = None
        if eval_source is not None and cfg.eval_every and (self.step % cfg.eval_every == 0
                                                           or self.step == cfg.steps):
            eval_metrics = self.evaluate(eval_source, self._params, self._rest, self._frozen_states)
            self._log(self._log_file, self._writer, "eval", eval_metrics)
        if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps:
            self._save(self._ckpt, {f"eval/{k}": v for k, v in (eval_metrics or {}).items()})
        return metrics

    def sync_model(self) -> None:
        """Write the current parameters into `self.model` (the next `train_on` donates these buffers)."""
        nnx.update(self.model, self._state(self._params), self._rest)

    def close(self) -> None:
        """End step-by-step training: wait for checkpoints, close the logs, write the parameters into `model`."""
        try:
            self._ckpt.wait_until_finished()
            self._ckpt.close()
            self._log_file.close()
            if self._writer is not None:
                self._writer.close()
        finally:
            self._lock.release()
            self.sync_model()

    def fit(self, train: BatchSource, eval_source: BatchSource | None = None) -> dict[str, float]:
        """Train to `config.steps` optimizer steps (resuming from the latest checkpoint); returns last metrics."""
        cfg = self.config
        if len(train) == 0:
            raise TrainingError("the training set is empty.")
        if self.start():
            tqdm.write(f"resumed from step {self.step} ({self._ckpt.directory})")
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not cfg.progress)
        last: dict[str, float] = {}
        try:
            lengths = train.lengths() if cfg.group_by_length and hasattr(train, "lengths") else None
            while self.step < cfg.steps:
                idx = data_order(len(train), cfg.seed, self.step, cfg.batch_size, lengths, cfg.group_by_length)
                arrays, static = train.collate(idx)
                last = self.train_on(arrays, static, eval_source)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
        finally:
            bar.close()
            self.close()
        return last

    def _save(self, manager: ocp.CheckpointManager, metrics: dict[str, float]) -> None:
        manager.save(self.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self._state_tree()),
            meta=ocp.args.JsonSave({**self.checkpoint_meta, "step": self.step, "params": self._fingerprint(),
                                    "run_config": json.loads(json.dumps(self.run_config, default=str))})),
            metrics=metrics or None)

    def evaluate(self, source: BatchSource, params=None, rest=None, frozen_states=None) -> dict[str, float]:
        """Means over the eval rows (in order, `eval_batches` batches or all) of each row's loss and metrics.

        A row's loss is the loss of that row alone (the loss function applied to a batch of one), so the result
        is the plain mean over rows whatever the batch size: the last, partial batch is padded to the fixed
        batch shape and a row mask drops the padding rows."""
        params = self._params if params is None else params
        rest = self._rest if rest is None else rest
        frozen_states = frozen_states if frozen_states is not None else {
            k: s for k, (_, s) in self._frozen_split.items()}
        bs = self.config.batch_size
        n_batches = max(1, math.ceil(len(source) / bs))
        if self.config.eval_batches:
            n_batches = min(n_batches, self.config.eval_batches)
        sums: dict[str, float] = {}
        count = 0
        for b in range(n_batches):
            idx = np.arange(b * bs, min((b + 1) * bs, len(source)))
            real = len(idx)
            if real < bs:  # keep shapes fixed: pad with repeats, masked out below
                idx = np.concatenate([idx, np.resize(idx, bs - real)])
            arrays, static = source.collate(idx)
            valid = np.arange(bs) < real
            if self.mesh is not None:
                valid = jax.device_put(valid, self.mesh_context.batch_sharding(valid.shape))
            m = jax.device_get(self._eval_step(params, rest, frozen_states, self._device_batch(arrays),
                                               jnp.asarray(valid), static=static))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += real
        return {k: float(v / count) for k, v in sums.items()}

    def _log(self, fh, writer, split: str, metrics: dict[str, float]) -> None:
        fh.write(json.dumps({"step": self.step, "split": split, **metrics}) + "\n")
        fh.flush()
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(f"{split}/{k}", v, self.step)


def resume_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a run config a resume must keep: model, data, loss, optimizer, method and seed; not the loop's
    length, batching, logging, checkpointing or export settings."""
    out = {k: v for k, v in run_config.items() if k not in _RESUME_FREE and not k.endswith("export_dir")}
    for section, defaults in _ADDED_DEFAULTS.items():
        if isinstance(out.get(section), Mapping):
            out[section] = {**defaults, **out[section]}
    trainer = run_config.get("trainer")
    if isinstance(trainer, Mapping):
        out["trainer"] = {"seed": trainer.get("seed")}
    if isinstance(out.get("value"), Mapping):
        out["value"] = {k: v for k, v in out["value"].items() if k != "export_dir"}
    return out


_RESUME_FREE = ("trainer", "ref_cache_dir", "precompute_ref", "logprob_method", "remat")
# config keys added after checkpoints were written: a checkpoint whose config lacks one was trained with its
# default, so a resume must not refuse it for that
_ADDED_DEFAULTS: dict[str, dict[str, Any]] = {"loss": {"delta_reference": "augmented",
                                                      "ipo_delta_units": "reward"}}


def trim_metrics(path: Path, step: int) -> None:
    """Drop the rows of a metrics JSONL logged after `step` (and a torn last line); tmp file + rename."""
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    keep = []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a torn line left by a kill
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line + b"\n")
    if len(keep) == sum(1 for x in lines if x.strip()) and (not lines[-1] or lines[-1].strip() == b""):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(keep))
    tmp.replace(path)


def _count_tokens(arrays: Any) -> int:
    """Real tokens in a batch: the sum of its attention masks (dict batches) or the non-padding segment ids
    (typed batches, prs_jax.data.batches)."""
    total = 0
    for path, v in jax.tree_util.tree_flatten_with_path(arrays)[0]:
        name = jax.tree_util.keystr(path)
        if name.endswith("segment_ids"):
            total += int((np.asarray(v) > 0).sum())
        elif name.rstrip("']").endswith("mask") and not name.rstrip("']").endswith("loss_mask"):
            total += int(np.asarray(v).sum())
    return total


class ArraySource:
    """A BatchSource over a pytree of equally long NumPy arrays (a dict, or a typed batch such as
    prs_jax.data.batches.PairBatch; already tokenised and padded), indexed on the leading axis; `static_fn`
    (optional) derives the static facts of a batch from it."""

    def __init__(self, arrays: Any, static_fn: Callable[[Any], Any] | None = None):
        leaves = jax.tree_util.tree_flatten_with_path(arrays)[0]
        lengths = {jax.tree_util.keystr(p): len(v) for p, v in leaves}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"ArraySource: arrays differ in length: {lengths}")
        self.arrays = jax.tree.map(np.asarray, arrays)
        self.static_fn = static_fn
        self._n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._n

    def collate(self, indices: np.ndarray) -> tuple[Any, Any]:
        batch = jax.tree.map(lambda v: v[indices], self.arrays)
        return batch, (self.static_fn(batch) if self.static_fn is not None else None)
