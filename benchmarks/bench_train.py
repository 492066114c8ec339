"""Training benchmarks T1-T3, side by side with Hugging Face TRL (same run, same data, same checkpoint).

    python benchmarks/bench_train.py --out benchmarks/results/train.json [--quick]

Model for every contender: the same random tiny Llama checkpoint (hidden 256, 4 layers, 4 heads, vocab 32000,
float32), written once by prs_jax.models.tiny.build_checkpoint and loaded by both prs_jax and transformers.
Data: 8 * `--batches` preference pairs, prompt 64 tokens + response 64 tokens (63 words and EOS) for chosen and
rejected; batch 8 pairs. TRL takes text only, so a word-level tokenizer ("wN" <-> id N) makes the texts
round-trip to exactly the token ids prs_jax gets (checked in the run: TRL's tokenised dataset must equal the
prs_jax arrays, and both sides' reference log-probs must agree).

T1  DPO optimizer steps/s, prs_jax Trainer vs TRL DPOTrainer (torch CPU, f32, 2 threads), with a live reference
    model and with precomputed reference log-probs. Goal: prs_jax >= 2x TRL in both modes.
T2  Sr-DPO step time / DPO step time in prs_jax, both with precomputed reference log-probs. Goal <= 1.2.
T3  Token log-probs (values + gradient w.r.t. the hidden states) at vocab 128k, [8, 128] tokens, hidden 256:
    method "chunked" (several chunk sizes) vs "plain": peak XLA temporaries (compiled memory_analysis) and time.
    Goals: >= 8x less memory, <= 1.2x plain's time.

Timing. A "step" is one optimizer step: forward + backward of the loss, gradient clipping (norm 1.0), AdamW
update. TRL: the time between the Trainer callbacks on_step_begin and on_step_end inside `trainer.train()`
(training_step + clip + optimizer.step + scheduler + zero_grad; the batch was already fetched and collated
before on_step_begin, logging and saving happen after on_step_end). prs_jax: a call of the Trainer's jitted
`_train_step` on a batch already on the device, until its outputs are ready (what `Trainer.fit` runs per step,
minus the host-side collation, logging and checkpointing). Contenders run in alternated rounds; in every round
each one runs one untimed warm-up step, then `--steps` timed steps. Medians over all timed steps are reported.
The first prs_jax call (trace + XLA compile + one step) is reported apart as first_call_s, and compile_s =
first_call_s - median step.

Contention. On a shared machine other processes distort the timings (torch's OpenMP threads suffer more than
XLA's pool). Every timed step records how many cores OTHER processes kept busy meanwhile (/proc/stat minus this
process's CPU time); before each contender's round the script waits (--quiet-wait, capped) for the CPUs to be
free. Besides the medians of all timed steps (the headline numbers), the JSON gives per-round ratios (each
round's contenders ran back to back) and medians over the "quiet" steps only (others < 0.3 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from prs_jax.data.batching import bucket_length  # noqa: E402
from prs_jax.models import load_causal_lm  # noqa: E402
from prs_jax.models.tiny import build_checkpoint  # noqa: E402
from prs_jax.train.logprobs import token_logprobs  # noqa: E402
from prs_jax.train.objectives import PreferenceLoss, Static, bucket_r_max  # noqa: E402
from prs_jax.train.reference import compute_reference  # noqa: E402
from prs_jax.train.trainer import OptimConfig, Trainer, TrainerConfig  # noqa: E402

VOCAB = 32000
MODEL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=512)
PAD, EOS, UNK = 0, 1, 2  # "<pad>", "</s>", "<unk>"; word "wN" has id N for 3 <= N < VOCAB
PROMPT_LEN, RESP_LEN, BATCH = 64, 64, 8
SR_PREFIX_LEN = 16  # the Sr-DPO prompt prefix p, in tokens
LR, BETA, SR_LAM = 1e-5, 0.1, 0.5
QUIET_CORES = 0.3  # a step is "quiet" when other processes kept fewer cores than this busy during it


# ------------------------------------------------------------------------------------------------ contention
_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_snapshot() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds used by this process), from /proc/stat and os.times."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(x) for x in fh.readline().split()[1:9]]
        busy = (sum(vals) - vals[3] - vals[4]) / _CLK  # minus idle and iowait
    except OSError:
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system


def other_cores(before: tuple[float, float], after: tuple[float, float], wall: float) -> float:
    """Cores kept busy by OTHER processes between two snapshots (0 on a quiet machine)."""
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / max(wall, 1e-9))


def wait_quiet(max_wait_s: float, threshold: float = 0.3, window_s: float = 2.0) -> tuple[float, float]:
    """Wait (up to max_wait_s) until other processes keep fewer than `threshold` cores busy; returns (waited
    seconds, the last measured other-process load)."""
    t_start = time.perf_counter()
    while True:
        a, t0 = _cpu_snapshot(), time.perf_counter()
        time.sleep(window_s)
        load = other_cores(a, _cpu_snapshot(), time.perf_counter() - t0)
        waited = time.perf_counter() - t_start
        if load < threshold or waited >= max_wait_s:
            return waited, load


# ------------------------------------------------------------------------------------------------ setup
def build_word_tokenizer(out_dir: Path) -> Path:
    """A WordLevel tokenizer whose ids round-trip: "<pad>" 0, "</s>" 1 (EOS), "<unk>" 2, then "wN" = N."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return out_dir


def words(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def make_data(n_pairs: int, seed: int = 0) -> tuple[dict[str, list[str]], dict[str, np.ndarray], np.ndarray]:
    """Texts for TRL, pair arrays for prs_jax (same ids), and the Sr-DPO prefix ids."""
    rng = np.random.default_rng(seed)
    t = PROMPT_LEN + RESP_LEN
    texts: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    arrays: dict[str, list[np.ndarray]] = {}
    for _ in range(n_pairs):
        prompt = rng.integers(3, VOCAB, PROMPT_LEN)
        texts["prompt"].append(words(prompt))
        for side in ("chosen", "rejected"):
            resp = np.append(rng.integers(3, VOCAB, RESP_LEN - 1), EOS)
            # leading space: TRL tokenises prompt + chosen as one string; trailing "</s>": TRL adds no second EOS
            texts[side].append(" " + words(resp[:-1]) + "</s>")
            arrays.setdefault(f"{side}_ids", []).append(np.concatenate([prompt, resp]).astype(np.int32))
            arrays.setdefault(f"{side}_mask", []).append(np.ones(t, np.int32))
            arrays.setdefault(f"{side}_loss_mask", []).append((np.arange(t) >= PROMPT_LEN).astype(np.int32))
    prefix = rng.integers(3, VOCAB, SR_PREFIX_LEN).astype(np.int32)
    return texts, {k: np.stack(v) for k, v in arrays.items()}, prefix


def augment(arrays: dict[str, np.ndarray], prefix: np.ndarray, shared_t: int | None = None) -> dict[str, np.ndarray]:
    """Add the p (+) x views (prefix before the prompt, same responses). shared_t: pad EVERY view (plain ones
    included) to that length, as prs_jax.data.pairs.collate_pairs does (one T for all arrays)."""
    out = dict(arrays)
    n = len(arrays["chosen_ids"])
    for side in ("chosen", "rejected"):
        out[f"{side}_aug_ids"] = np.concatenate([np.tile(prefix, (n, 1)), arrays[f"{side}_ids"]], axis=1)
        out[f"{side}_aug_mask"] = np.concatenate([np.ones((n, len(prefix)), np.int32), arrays[f"{side}_mask"]], 1)
        out[f"{side}_aug_loss_mask"] = np.concatenate([np.zeros((n, len(prefix)), np.int32),
                                                       arrays[f"{side}_loss_mask"]], axis=1)
    if shared_t is not None:
        for k in [k for k in out if k.endswith(("_ids", "_mask"))]:
            a = out[k]
            out[k] = np.pad(a, ((0, 0), (0, shared_t - a.shape[1])))
    return out


def pair_static(batch: dict[str, np.ndarray]) -> Static:
    return Static(r_max=bucket_r_max(batch["chosen_loss_mask"], batch["rejected_loss_mask"]))


# ------------------------------------------------------------------------------------------------ contenders
class JaxContender:
    """prs_jax: the Trainer's jitted `_train_step` on device-resident batches (see the module docstring)."""

    def __init__(self, name: str, ckpt: Path, loss: PreferenceLoss, arrays: dict[str, np.ndarray],
                 live_ref: bool, out_dir: Path):
        self.name = name
        frozen = {"ref": load_causal_lm(ckpt)} if live_ref else None
        self.trainer = Trainer(load_causal_lm(ckpt), loss,
                               TrainerConfig(out_dir=str(out_dir), steps=10_000, batch_size=BATCH, progress=False,
                                             tensorboard=False, save_every=0),
                               OptimConfig(lr=LR), frozen=frozen)
        tr = self.trainer
        self.params = tr._params
        self.opt_state = tr.tx.init(self.params)
        self.rest = tr._rest
        self.frozen_states = {k: s for k, (_, s) in tr._frozen_split.items()}
        n = len(arrays["chosen_ids"])
        self.batches = []
        for start in range(0, n - BATCH + 1, BATCH):
            np_batch = {k: v[start:start + BATCH] for k, v in arrays.items()}
            self.batches.append(({k: jnp.asarray(v) for k, v in np_batch.items()}, pair_static(np_batch)))
        assert len({s for _, s in self.batches}) == 1, "one compiled shape"
        self.shapes = {k: list(v.shape) for k, v in self.batches[0][0].items()}
        self.i = 0
        self.times: list[float] = []
        self.others: list[float] = []
        self.first_call_s = None
        self.losses: list[float] = []

    def step(self) -> float:
        batch, static = self.batches[self.i % len(self.batches)]
        self.i += 1
        snap, t0 = _cpu_snapshot(), time.perf_counter()
        self.params, self.opt_state, metrics = self.trainer._train_step(
            self.params, self.opt_state, self.rest, self.frozen_states, batch, static=static)
        jax.block_until_ready((self.params, self.opt_state, metrics))
        dt = time.perf_counter() - t0
        self._last_other = other_cores(snap, _cpu_snapshot(), dt)
        self.losses.append(float(metrics["loss"]))
        return dt

    def warm(self) -> None:
        if self.first_call_s is None:
            self.first_call_s = self.step()
        else:
            self.step()

    def run(self, k: int) -> None:
        self.warm()
        for _ in range(k):
            self.times.append(self.step())
            self.others.append(self._last_other)


class TrlContender:
    """TRL DPOTrainer.train(): steps timed between on_step_begin and on_step_end (see the module docstring)."""

    def __init__(self, name: str, ckpt: Path, tok_dir: Path, texts: dict[str, list[str]], precompute: bool,
                 out_dir: Path, steps_per_round: int):
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import DPOConfig, DPOTrainer

        self.name = name
        times = self.times_all = []
        others = self.others_all = []

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.snap, self.t0 = _cpu_snapshot(), time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                dt = time.perf_counter() - self.t0
                times.append(dt)
                others.append(other_cores(self.snap, _cpu_snapshot(), dt))

        def load():
            return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="sdpa")

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        cfg = DPOConfig(
            output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_steps=steps_per_round + 1,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            optim="adamw_torch", beta=BETA, loss_type=["sigmoid"], bf16=False, fp16=False,
            gradient_checkpointing=False, activation_checkpointing=False, use_cpu=True, report_to="none",
            logging_steps=10**6,
            save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
            dataloader_drop_last=True, max_length=None, precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=BATCH, seed=0)
        t0 = time.perf_counter()
        self.trainer = DPOTrainer(model=load(), ref_model=None if precompute else load(), args=cfg,
                                  train_dataset=Dataset.from_dict(texts), processing_class=tok,
                                  callbacks=[StepTimer()])
        self.init_s = time.perf_counter() - t0  # tokenisation (+ reference log-probs when precomputing)
        m = self.trainer.model
        self.config_check = {"bf16": bool(cfg.bf16), "fp16": bool(cfg.fp16),
                             "activation_checkpointing": bool(m.is_activation_checkpointing),
                             "mixed_precision": str(self.trainer.accelerator.mixed_precision),
                             "param_dtype": str(next(m.parameters()).dtype), "device": str(self.trainer.args.device),
                             "attn_implementation": m.config._attn_implementation,
                             "torch_threads": torch.get_num_threads()}
        self.times: list[float] = []
        self.others: list[float] = []

    def run(self, k: int) -> None:
        start = len(self.times_all)
        self.trainer.train()  # k + 1 steps; the first of every round is the untimed warm-up
        new = self.times_all[start:]
        assert len(new) == k + 1, (len(new), k)
        self.times.extend(new[1:])
        self.others.extend(self.others_all[start + 1:])

    def dataset_arrays(self) -> dict[str, np.ndarray]:
        ds = self.trainer.train_dataset
        out = {}
        for side in ("chosen", "rejected"):
            out[f"{side}_ids"] = np.array([p + c for p, c in zip(ds["prompt_ids"], ds[f"{side}_ids"])], np.int32)
        if "ref_chosen_logps" in ds.column_names:
            out["ref_chosen"] = np.asarray(ds["ref_chosen_logps"], np.float32)
            out["ref_rejected"] = np.asarray(ds["ref_rejected_logps"], np.float32)
        return out


def summary(c) -> dict:
    med = statistics.median(c.times)
    d = {"median_step_s": med, "steps_per_s": 1.0 / med, "timed_steps": len(c.times),
         "min_step_s": min(c.times), "max_step_s": max(c.times), "step_times_s": [round(x, 4) for x in c.times],
         "other_process_cores_per_step": [round(x, 2) for x in c.others]}
    quiet = [t for t, o in zip(c.times, c.others) if o < QUIET_CORES]
    d["quiet_steps"] = len(quiet)
    d["median_step_s_quiet_steps"] = statistics.median(quiet) if quiet else None
    if isinstance(c, JaxContender):
        d["first_call_s"] = c.first_call_s
        d["compile_s"] = c.first_call_s - med
        d["batch_shapes"] = c.shapes
        d["first_loss"], d["last_loss"] = c.losses[0], c.losses[-1]
    else:
        d["trainer_init_s"] = c.init_s
        d["first_step_s"] = c.times_all[0]  # torch has no compile; its very first (untimed) step, for reference
    return d


# ------------------------------------------------------------------------------------------------ T3
def bench_logprobs(chunks: list[int], repeats: int, vocab: int = 128_000) -> dict:
    b, t, d = 8, 128, 256
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(kh, (b, t, d), jnp.float32)
    w = jax.random.normal(kw, (d, vocab), jnp.float32) / np.sqrt(d)
    targets = jax.random.randint(kt, (b, t), 0, vocab)
    out: dict = {"shape": {"tokens": [b, t], "hidden": d, "vocab": vocab}, "repeats": repeats}
    variants = [("plain", None)] + [("chunked", c) for c in chunks]

    for wrt in ("hidden", "hidden_and_w"):
        argnums = 0 if wrt == "hidden" else (0, 1)
        fns, rows, first = {}, {}, {}
        for method, chunk in variants:
            name = method if chunk is None else f"chunked_{chunk}"

            def loss(h, w_, tg, method=method, chunk=chunk):
                return jnp.sum(token_logprobs(h, w_, tg, method=method, chunk_size=chunk))

            f = jax.jit(jax.value_and_grad(loss, argnums=argnums))
            t0 = time.perf_counter()
            compiled = f.lower(hidden, w, targets).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            fns[name] = compiled
            rows[name] = {"temp_bytes": int(mem.temp_size_in_bytes), "temp_mib": mem.temp_size_in_bytes / 2**20,
                          "output_bytes": int(mem.output_size_in_bytes), "compile_s": compile_s, "times_s": [],
                          "other_process_cores": []}
            first[name] = jax.block_until_ready(compiled(hidden, w, targets))  # warm-up, kept for the checks
        ref_val, ref_grad = first["plain"]
        for name, (val, grad) in first.items():
            g0, r0 = (grad, ref_grad) if wrt == "hidden" else (grad[0], ref_grad[0])
            rows[name]["max_abs_grad_hidden_diff_vs_plain"] = float(jnp.max(jnp.abs(g0 - r0)))
            rows[name]["value_rel_diff_vs_plain"] = float(jnp.abs(val - ref_val) / jnp.abs(ref_val))
            if wrt != "hidden":
                rows[name]["max_abs_grad_w_diff_vs_plain"] = float(jnp.max(jnp.abs(grad[1] - ref_grad[1])))
        for _ in range(repeats):  # alternated
            for name, fn in fns.items():
                snap, t0 = _cpu_snapshot(), time.perf_counter()
                jax.block_until_ready(fn(hidden, w, targets))
                dt = time.perf_counter() - t0
                rows[name]["times_s"].append(dt)
                rows[name]["other_process_cores"].append(round(other_cores(snap, _cpu_snapshot(), dt), 2))
        plain = rows["plain"]
        plain["median_s"] = statistics.median(plain["times_s"])
        for name, r in rows.items():
            r["median_s"] = statistics.median(r["times_s"])
            r["times_s"] = [round(x, 4) for x in r["times_s"]]
            if name != "plain":
                r["memory_reduction_vs_plain"] = plain["temp_bytes"] / max(r["temp_bytes"], 1)
                r["time_ratio_vs_plain"] = r["median_s"] / plain["median_s"]
                r["goal_memory_met"] = r["memory_reduction_vs_plain"] >= 8
                r["goal_time_met"] = r["time_ratio_vs_plain"] <= 1.2
        out[f"grad_wrt_{wrt}"] = rows
        print(f"T3 grad wrt {wrt}:", json.dumps({k: {kk: v[kk] for kk in ("temp_mib", "median_s")}
                                                   for k, v in rows.items()}), flush=True)
    out["goal"] = "chunked: >= 8x less XLA temp memory than plain and <= 1.2x its time (grad w.r.t. hidden)"
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train.json"))
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds of all contenders")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per contender per round (after 1 warm-up)")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches of 8 pairs in the data set")
    ap.add_argument("--chunks", default="2048,4096,8192", help="T3 vocabulary chunk sizes")
    ap.add_argument("--t3-repeats", type=int, default=3)
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="before each contender's round, wait up to this many seconds for other processes to leave "
                         "the CPUs (they distort the timings; torch's OpenMP threads suffer most)")
    ap.add_argument("--quiet-wait-total", type=float, default=120.0, help="cap on all quiet waits together")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: t1,t2,t3")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 steps, fewer variants")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.t3_repeats, args.chunks, args.quiet_wait = 1, 2, 2, "4096", 0.0
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}

    import torch
    import transformers
    import trl
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="prs_bench_train_"))
    tok_dir = build_word_tokenizer(tmp / "tokenizer")
    ckpt = build_checkpoint(tmp / "llama-h256", "llama", seed=0, tokenizer_dir=tok_dir, pad_token_id=PAD,
                            bos_token_id=EOS, eos_token_id=EOS, **MODEL)
    n_pairs = BATCH * args.batches
    texts, arrays, prefix = make_data(n_pairs)

    results: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} ({jax.default_backend()}), "
                   f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
                   f"{transformers.__version__}, trl {trl.__version__}",
        "model": {**MODEL, "dtype": "float32", "checkpoint": "prs_jax.models.tiny.build_checkpoint(seed=0), same "
                  "files for prs_jax and TRL (policy and reference)"},
        "data": {"pairs": n_pairs, "batch_pairs": BATCH, "prompt_tokens": PROMPT_LEN,
                 "response_tokens": f"{RESP_LEN} (63 random words + EOS)", "sr_dpo_prefix_tokens": SR_PREFIX_LEN},
        "optimizer": f"AdamW lr {LR}, constant, grad clip 1.0, weight decay 0; DPO sigmoid beta {BETA}",
        "protocol": {"rounds": args.rounds, "timed_steps_per_round": args.steps, "warmup_steps_per_round": 1,
                     "quick": args.quick,
                     "timing": "TRL: on_step_begin..on_step_end callbacks inside trainer.train() (fwd+bwd, clip, "
                               "AdamW, zero_grad; collation excluded). prs_jax: Trainer._train_step on a device batch "
                               "until outputs are ready (fwd+bwd, clip, AdamW). Contenders alternated per round; "
                               "medians of all timed steps; compile reported apart."},
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    summary_block: dict = {}
    results["summary"] = summary_block

    def save():
        results["wall_s"] = round(time.perf_counter() - t_run, 1)
        out.write_text(json.dumps(results, indent=1))

    # ---------------- contenders
    contenders = []
    checks: dict = {}
    if "t1" not in skip or "t2" not in skip:
        t0 = time.perf_counter()
        ref_model = load_causal_lm(ckpt)
        ref_arrays = compute_reference(ref_model, arrays, batch_size=BATCH)
        prs_ref_s = time.perf_counter() - t0
        aug = augment(arrays, prefix)
        aug_ref = compute_reference(ref_model, aug, batch_size=BATCH, augmented=True)
        del ref_model
        pre = {**arrays, **ref_arrays}
        sr_pre = {**aug, **aug_ref}
        dpo = PreferenceLoss("sigmoid", beta=BETA)
        sr = PreferenceLoss("sr_dpo", beta=BETA, lam=SR_LAM)
        if "t1" not in skip:
            trl_live = TrlContender("trl_live_ref", ckpt, tok_dir, texts, False, tmp / "trl_live", args.steps)
            trl_pre = TrlContender("trl_precomputed_ref", ckpt, tok_dir, texts, True, tmp / "trl_pre", args.steps)
            # same data: TRL's tokenised rows must be the prs_jax ids; reference log-probs must agree
            got = trl_live.dataset_arrays()
            checks["trl_token_ids_equal_prs_jax"] = all(np.array_equal(got[k], arrays[k])
                                                        for k in ("chosen_ids", "rejected_ids"))
            ref_trl = trl_pre.dataset_arrays()
            checks["ref_logps_max_abs_diff_trl_vs_prs_jax"] = float(max(
                np.max(np.abs(ref_trl[k] - ref_arrays[k])) for k in ("ref_chosen", "ref_rejected")))
            checks["ref_logps_mean_abs_value"] = float(np.mean(np.abs(ref_arrays["ref_chosen"])))
            checks["prs_jax_precompute_ref_s (incl. compile)"] = prs_ref_s
            checks["trl_config"] = {c.name: c.config_check for c in (trl_live, trl_pre)}
            print("checks", checks, flush=True)
            if not checks["trl_token_ids_equal_prs_jax"]:
                raise SystemExit("TRL tokenised the texts into other ids than prs_jax gets; the comparison is void.")
            contenders += [trl_live, JaxContender("prs_jax_live_ref", ckpt, dpo, arrays, True, tmp / "j_live"),
                           trl_pre]
        contenders.append(JaxContender("prs_jax_precomputed_ref", ckpt, dpo, pre, False, tmp / "j_pre"))
        if "t2" not in skip:
            contenders.append(JaxContender("prs_jax_sr_dpo_precomputed_ref", ckpt, sr, sr_pre, False, tmp / "j_sr"))
            if not args.quick:
                # The layout collate_pairs produces: one T for all views, the 144-token p (+) x rows bucketed to 192
                # and the 128-token plain rows padded to 192 with them.
                t_shared = bucket_length(PROMPT_LEN + RESP_LEN + SR_PREFIX_LEN)
                shared = {**augment(arrays, prefix, shared_t=t_shared), **aug_ref, **ref_arrays}
                contenders.append(JaxContender("prs_jax_sr_dpo_precomputed_ref_collate_pairs_layout", ckpt, sr,
                                               shared, False, tmp / "j_sr_shared"))
        results["checks"] = checks

        waits, waited_total = [], 0.0
        for r in range(args.rounds):
            for c in contenders:
                budget = min(args.quiet_wait, args.quiet_wait_total - waited_total)
                if budget > 0:
                    waited, load = wait_quiet(budget)
                    waited_total += waited
                    waits.append({"round": r + 1, "contender": c.name, "waited_s": round(waited, 1),
                                  "other_process_cores_then": round(load, 2)})
                t0 = time.perf_counter()
                c.run(args.steps)
                print(f"round {r + 1}/{args.rounds} {c.name}: median so far {statistics.median(c.times):.3f} s/step; "
                      f"other processes kept {statistics.median(c.others[-args.steps:]):.2f} cores busy "
                      f"(round took {time.perf_counter() - t0:.1f} s)", flush=True)
        results["quiet_waits"] = {"total_s": round(waited_total, 1), "per_round": waits}
        summary_block["median_other_process_cores_during_timed_steps"] = round(
            statistics.median(o for c in contenders for o in c.others), 2)
        summary_block["quiet_steps"] = f"{sum(o < QUIET_CORES for c in contenders for o in c.others)} of " \
                                       f"{sum(len(c.others) for c in contenders)}"
        by = {c.name: summary(c) for c in contenders}

        def per_round_ratios(num: str, den: str) -> list[float]:
            a, b, k = by[num]["step_times_s"], by[den]["step_times_s"], args.steps
            return [round(statistics.median(a[i:i + k]) / statistics.median(b[i:i + k]), 3)
                    for i in range(0, len(a), k)]

        def quiet_ratio(num: str, den: str) -> float | None:
            a, b = by[num]["median_step_s_quiet_steps"], by[den]["median_step_s_quiet_steps"]
            return a / b if a and b else None

        if "t1" not in skip:
            t1 = {k: by[k] for k in ("trl_live_ref", "prs_jax_live_ref", "trl_precomputed_ref",
                                     "prs_jax_precomputed_ref")}
            t1["trl_live_ref"]["note"] = "trainer_init_s: tokenisation of the data set"
            t1["trl_precomputed_ref"]["note"] = "trainer_init_s: tokenisation + reference log-probs"
            for mode in ("live_ref", "precomputed_ref"):
                sp = by[f"trl_{mode}"]["median_step_s"] / by[f"prs_jax_{mode}"]["median_step_s"]
                t1[f"speedup_{mode}"] = sp
                t1[f"goal_met_{mode}"] = sp >= 2.0
                t1[f"speedup_{mode}_per_round"] = per_round_ratios(f"trl_{mode}", f"prs_jax_{mode}")
                t1[f"speedup_{mode}_quiet_steps_only"] = quiet_ratio(f"trl_{mode}", f"prs_jax_{mode}")
            t1["goal"] = "prs_jax >= 2x TRL DPOTrainer steps/s, with and without precomputed reference log-probs"
            results["T1_dpo_steps"] = t1
            for mode in ("live_ref", "precomputed_ref"):
                summary_block[f"T1_speedup_{mode}"] = round(t1[f"speedup_{mode}"], 3)
                summary_block[f"T1_goal_met_{mode}"] = t1[f"goal_met_{mode}"]
                q = t1[f"speedup_{mode}_quiet_steps_only"]
                summary_block[f"T1_speedup_{mode}_quiet_steps_only"] = None if q is None else round(q, 3)
            print("T1", json.dumps({k: v for k, v in t1.items() if not isinstance(v, dict)}), flush=True)
        if "t2" not in skip:
            base = by["prs_jax_precomputed_ref"]["median_step_s"]
            t2 = {"prs_jax_precomputed_ref": by["prs_jax_precomputed_ref"],
                  "prs_jax_sr_dpo_precomputed_ref": by["prs_jax_sr_dpo_precomputed_ref"],
                  "ratio_sr_dpo_over_dpo": by["prs_jax_sr_dpo_precomputed_ref"]["median_step_s"] / base}
            t2["goal_met"] = t2["ratio_sr_dpo_over_dpo"] <= 1.2
            t2["ratio_sr_dpo_over_dpo_per_round"] = per_round_ratios("prs_jax_sr_dpo_precomputed_ref",
                                                                     "prs_jax_precomputed_ref")
            t2["ratio_sr_dpo_over_dpo_quiet_steps_only"] = quiet_ratio("prs_jax_sr_dpo_precomputed_ref",
                                                                       "prs_jax_precomputed_ref")
            name = "prs_jax_sr_dpo_precomputed_ref_collate_pairs_layout"
            if name in by:
                t2[name] = by[name]
                t2["ratio_collate_pairs_layout_over_dpo"] = by[name]["median_step_s"] / base
            t2["layout"] = (f"plain views [8, {PROMPT_LEN + RESP_LEN}], p (+) x views [8, "
                            f"{PROMPT_LEN + RESP_LEN + SR_PREFIX_LEN}] (prefix p of {SR_PREFIX_LEN} tokens); the "
                            "collate_pairs layout pads all views to one bucketed T")
            t2["goal"] = "Sr-DPO step / DPO step <= 1.2 (paper: 1.24), both with precomputed reference log-probs"
            t2["lambda"] = SR_LAM
            results["T2_sr_dpo_overhead"] = t2
            summary_block["T2_ratio_sr_dpo_over_dpo"] = round(t2["ratio_sr_dpo_over_dpo"], 3)
            summary_block["T2_goal_met"] = t2["goal_met"]
            q = t2["ratio_sr_dpo_over_dpo_quiet_steps_only"]
            summary_block["T2_ratio_quiet_steps_only"] = None if q is None else round(q, 3)
            print("T2", json.dumps({k: v for k, v in t2.items() if not isinstance(v, dict)}), flush=True)
        save()

    if "t3" not in skip:
        chunks = [int(c) for c in args.chunks.split(",") if c]
        t3 = results["T3_logprobs_vocab_128k"] = bench_logprobs(chunks, args.t3_repeats)
        for name, r in t3["grad_wrt_hidden"].items():
            if name != "plain":
                summary_block[f"T3_{name}"] = {"memory_reduction": round(r["memory_reduction_vs_plain"], 1),
                                               "time_ratio": round(r["time_ratio_vs_plain"], 3),
                                               "goals_met": r["goal_memory_met"] and r["goal_time_met"]}
        save()
    print("summary", json.dumps(summary_block), f"\nwrote {out} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
