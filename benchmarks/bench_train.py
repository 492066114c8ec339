"""Training benchmarks T1-T3, side by side with Hugging Face TRL (same run, same data, same checkpoint).

    python benchmarks/bench_train.py --out benchmarks/results/train.json [--quick]

Model for every contender: the same random tiny Llama checkpoint (hidden 256, 4 layers, 4 heads, vocab 32000,
float32), written once by prs_jax.models.tiny.build_checkpoint and loaded by both prs_jax and transformers.
Data, per shape (`--shapes`, default "64x64,256x64": prompt x response tokens): 8 * `--batches` preference
pairs, random prompt words + a response of (response - 1) words and EOS, for chosen and rejected; batch 8 pairs.
TRL takes text only, so a word-level tokenizer ("wN" <-> id N) makes the texts round-trip to exactly the token
ids prs_jax gets (checked in the run: TRL's tokenised dataset must equal the prs_jax ids, and both sides'
reference log-probs must agree).

prs_jax runs each preference batch in the three layouts of prs_jax.data.pairs.collate_pairs: "packed" (one row
[prompt | chosen | rejected] per pair, block mask: the prompt is computed once; the default), "cascade" (the
prompt once as its own row, the responses attend to its keys/values by cascade attention, gradients through
it) and "separate" (rows [prompt | chosen], [prompt | rejected]: the unshared forward).

T1  DPO optimizer steps/s, prs_jax Trainer vs TRL DPOTrainer (torch CPU, f32, 2 threads), with a live reference
    model and with precomputed reference log-probs. Goal (issue 17): prs_jax >= 5x TRL with precomputed
    references at prompt 256 + response 64 (the shape where sharing matters); the 64 + 64 shape is kept.
T2  Sr-DPO step time / DPO step time in prs_jax, both with precomputed reference log-probs, same layout.
    Goal <= 1.1 (issue 17; the p (+) x view is its own packed row [p + x | chosen | rejected]).
T3  Token log-probs (values + gradient w.r.t. the hidden states) at vocab 128k, [8, 128] tokens, hidden 256:
    method "chunked" (several chunk sizes) vs "plain": peak XLA temporaries (compiled memory_analysis) and time.
    Goals: >= 8x less memory, <= 1.2x plain's time. (With --skip t3 the previous JSON's T3 block is kept,
    marked with its date.)

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

import dataclasses  # noqa: E402

from prs_jax.data.batches import PairBatch  # noqa: E402
from prs_jax.data.pairs import TokenizedPair, collate_pairs  # noqa: E402
from prs_jax.models import load_causal_lm  # noqa: E402
from prs_jax.models.tiny import build_checkpoint  # noqa: E402
from prs_jax.train.logprobs import token_logprobs  # noqa: E402
from prs_jax.train.objectives import PreferenceLoss  # noqa: E402
from prs_jax.train.reference import compute_reference  # noqa: E402
from prs_jax.train.trainer import OptimConfig, Trainer, TrainerConfig  # noqa: E402

VOCAB = 32000
MODEL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=512)
PAD, EOS, UNK = 0, 1, 2  # "<pad>", "</s>", "<unk>"; word "wN" has id N for 3 <= N < VOCAB
BATCH = 8
PAD_MULTIPLE = 16
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


def make_data(n_pairs: int, prompt_len: int, resp_len: int, seed: int = 0
              ) -> tuple[dict[str, list[str]], list[TokenizedPair]]:
    """Texts for TRL and the same pairs as prs_jax token ids (each with its p (+) x view: an Sr-DPO prefix of
    SR_PREFIX_LEN tokens before the prompt)."""
    rng = np.random.default_rng(seed)
    texts: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    prefix = rng.integers(3, VOCAB, SR_PREFIX_LEN).astype(np.int32)
    pairs = []
    for _ in range(n_pairs):
        prompt = rng.integers(3, VOCAB, prompt_len).astype(np.int32)
        texts["prompt"].append(words(prompt))
        resps = []
        for side in ("chosen", "rejected"):
            resp = np.append(rng.integers(3, VOCAB, resp_len - 1), EOS).astype(np.int32)
            # leading space: TRL tokenises prompt + chosen as one string; trailing "</s>": TRL adds no second EOS
            texts[side].append(" " + words(resp[:-1]) + "</s>")
            resps.append(resp)
        aug = TokenizedPair(np.concatenate([prefix, prompt]), resps[0], resps[1])
        pairs.append(TokenizedPair(prompt, resps[0], resps[1], augmented=aug))
    return texts, pairs


def with_refs(data: PairBatch, refs: dict[str, np.ndarray], augmented: bool) -> PairBatch:
    """The batch with precomputed reference log-probs attached (and its p (+) x view only when used)."""
    keep = {k: v for k, v in refs.items() if augmented or not k.endswith("_aug")}
    return dataclasses.replace(data, aug=data.aug if augmented else None, **keep)


# ------------------------------------------------------------------------------------------------ contenders
class JaxContender:
    """prs_jax: the Trainer's jitted `_train_step` on device-resident batches (see the module docstring)."""

    def __init__(self, name: str, ckpt: Path, loss: PreferenceLoss, data: PairBatch, live_ref: bool,
                 out_dir: Path):
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
        n = len(jax.tree.leaves(data.x)[0])
        self.batches = [(jax.tree.map(lambda v, s=start: jnp.asarray(v[s:s + BATCH]), data), None)
                        for start in range(0, n - BATCH + 1, BATCH)]
        leaves = jax.tree_util.tree_flatten_with_path(self.batches[0][0])[0]
        self.shapes = {jax.tree_util.keystr(p, simple=True, separator="."): list(v.shape) for p, v in leaves
                       if jax.tree_util.keystr(p).endswith("tokens") or "target_slot" in jax.tree_util.keystr(p)}
        self.i = 0
        self.times: list[float] = []
        self.others: list[float] = []
        self.first_call_s = None
        self.losses: list[float] = []
        # FLOPs of one step from the lowered (unoptimised) HLO: the work each layout asks for, independent of noise
        cost = tr._train_step.lower(self.params, self.opt_state, self.rest, self.frozen_states, self.batches[0][0],
                                    static=None).cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        self.gflops = float(cost["flops"]) / 1e9 if cost and "flops" in cost else None

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
        d["step_gflops_lowered_hlo"] = c.gflops
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


# ------------------------------------------------------------------------------------------------ T1, T2
def bench_shape(prompt_len: int, resp_len: int, args, ckpt: Path, tok_dir: Path, tmp: Path, skip: set[str]
                ) -> tuple[dict, dict]:
    """T1 and T2 at one shape: (the shape's JSON block, its summary entries)."""
    tag = f"p{prompt_len}_r{resp_len}"
    texts, pairs = make_data(BATCH * args.batches, prompt_len, resp_len)
    block: dict = {"data": {"pairs": len(pairs), "batch_pairs": BATCH, "prompt_tokens": prompt_len,
                            "response_tokens": f"{resp_len} ({resp_len - 1} random words + EOS)",
                            "sr_dpo_prefix_tokens": SR_PREFIX_LEN, "pad_multiple": PAD_MULTIPLE}}
    summary_block: dict = {}
    layouts = ("packed", "cascade", "separate")
    # pad rows to a multiple of 16 (DataConfig.pad_multiple; TRL pads to the batch's longest row)
    data = {lay: collate_pairs(pairs, layout=lay, multiple=PAD_MULTIPLE) for lay in layouts}
    t0 = time.perf_counter()
    ref_model = load_causal_lm(ckpt)
    refs = compute_reference(ref_model, data["packed"], batch_size=BATCH, augmented=True, progress=False)
    prs_ref_s = time.perf_counter() - t0
    del ref_model
    dpo = PreferenceLoss("sigmoid", beta=BETA)
    sr = PreferenceLoss("sr_dpo", beta=BETA, lam=SR_LAM)
    contenders: list = []
    checks: dict = {}
    if "t1" not in skip:
        trl_pre = TrlContender("trl_precomputed_ref", ckpt, tok_dir, texts, True, tmp / f"trl_pre_{tag}", args.steps)
        got = trl_pre.dataset_arrays()
        checks["trl_token_ids_equal_prs_jax"] = all(
            np.array_equal(got[f"{side}_ids"][i], np.concatenate([p.prompt_ids, getattr(p, f"{side}_ids")]))
            for i, p in enumerate(pairs) for side in ("chosen", "rejected"))
        checks["ref_logps_max_abs_diff_trl_vs_prs_jax"] = float(max(
            np.max(np.abs(got[k] - refs[k])) for k in ("ref_chosen", "ref_rejected")))
        checks["ref_logps_mean_abs_value"] = float(np.mean(np.abs(refs["ref_chosen"])))
        checks["prs_jax_precompute_ref_s (incl. compile, both views)"] = prs_ref_s
        trl = [trl_pre]
        if not args.no_live:
            trl.insert(0, TrlContender("trl_live_ref", ckpt, tok_dir, texts, False, tmp / f"trl_live_{tag}",
                                       args.steps))
        checks["trl_config"] = {c.name: c.config_check for c in trl}
        print(tag, "checks", checks, flush=True)
        if not checks["trl_token_ids_equal_prs_jax"]:
            raise SystemExit("TRL tokenised the texts into other ids than prs_jax gets; the comparison is void.")
        contenders += trl
        if not args.no_live:
            contenders.append(JaxContender("prs_jax_live_ref_packed", ckpt, dpo, with_refs(data["packed"], {}, False),
                                           True, tmp / f"j_live_{tag}"))
    for lay in layouts:
        contenders.append(JaxContender(f"prs_jax_precomputed_ref_{lay}", ckpt, dpo,
                                       with_refs(data[lay], refs, False), False, tmp / f"j_pre_{lay}_{tag}"))
        if "t2" not in skip:
            contenders.append(JaxContender(f"prs_jax_sr_dpo_precomputed_ref_{lay}", ckpt, sr,
                                           with_refs(data[lay], refs, True), False, tmp / f"j_sr_{lay}_{tag}"))
    block["checks"] = checks

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
            print(f"{tag} round {r + 1}/{args.rounds} {c.name}: median so far {statistics.median(c.times):.3f} "
                  f"s/step; other processes kept {statistics.median(c.others[-args.steps:]):.2f} cores busy "
                  f"(round took {time.perf_counter() - t0:.1f} s)", flush=True)
    block["quiet_waits"] = {"total_s": round(waited_total, 1), "per_round": waits}
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
        t1 = dict(by)
        t1["trl_precomputed_ref"]["note"] = "trainer_init_s: tokenisation + reference log-probs"
        pairs_ = [(f"precomputed_ref_{lay}", "trl_precomputed_ref", f"prs_jax_precomputed_ref_{lay}")
                  for lay in layouts]
        if not args.no_live:
            t1["trl_live_ref"]["note"] = "trainer_init_s: tokenisation of the data set"
            pairs_.append(("live_ref_packed", "trl_live_ref", "prs_jax_live_ref_packed"))
        for mode, den, num in pairs_:
            sp = by[den]["median_step_s"] / by[num]["median_step_s"]
            t1[f"speedup_{mode}"] = sp
            t1[f"speedup_{mode}_per_round"] = per_round_ratios(den, num)
            t1[f"speedup_{mode}_quiet_steps_only"] = quiet_ratio(den, num)
            q = t1[f"speedup_{mode}_quiet_steps_only"]
            summary_block[f"T1_speedup_{mode}"] = round(sp, 3)
            summary_block[f"T1_speedup_{mode}_quiet_steps_only"] = None if q is None else round(q, 3)
        t1["goal_met_precomputed_ref"] = t1["speedup_precomputed_ref_packed"] >= 5.0
        summary_block["T1_goal_met_precomputed_ref"] = t1["goal_met_precomputed_ref"]
        for lay in layouts:
            summary_block[f"dpo_step_gflops_{lay}"] = by[f"prs_jax_precomputed_ref_{lay}"]["step_gflops_lowered_hlo"]
        for lay in ("packed", "cascade"):
            t1[f"{lay}_over_separate_step_time"] = (by[f"prs_jax_precomputed_ref_{lay}"]["median_step_s"]
                                                    / by["prs_jax_precomputed_ref_separate"]["median_step_s"])
            summary_block[f"{lay}_over_separate_dpo_step_time"] = round(t1[f"{lay}_over_separate_step_time"], 3)
        t1["goal"] = "prs_jax (packed, the default) >= 5x TRL DPOTrainer steps/s with precomputed reference log-probs"
        block["T1_dpo_steps"] = t1
        print(tag, "T1", json.dumps({k: v for k, v in t1.items() if not isinstance(v, dict)}), flush=True)
    if "t2" not in skip:
        t2: dict = {}
        for lay in layouts:
            base, name = f"prs_jax_precomputed_ref_{lay}", f"prs_jax_sr_dpo_precomputed_ref_{lay}"
            t2[name] = by[name]
            t2[base] = by[base]
            ratio = by[name]["median_step_s"] / by[base]["median_step_s"]
            t2[f"ratio_sr_dpo_over_dpo_{lay}"] = ratio
            t2[f"ratio_sr_dpo_over_dpo_{lay}_per_round"] = per_round_ratios(name, base)
            q = t2[f"ratio_sr_dpo_over_dpo_{lay}_quiet_steps_only"] = quiet_ratio(name, base)
            summary_block[f"T2_ratio_sr_dpo_over_dpo_{lay}"] = round(ratio, 3)
            if by[name]["step_gflops_lowered_hlo"] and by[base]["step_gflops_lowered_hlo"]:
                t2[f"flop_ratio_sr_dpo_over_dpo_{lay}"] = (by[name]["step_gflops_lowered_hlo"]
                                                           / by[base]["step_gflops_lowered_hlo"])
                summary_block[f"T2_flop_ratio_{lay}"] = round(t2[f"flop_ratio_sr_dpo_over_dpo_{lay}"], 3)
            summary_block[f"T2_ratio_{lay}_quiet_steps_only"] = None if q is None else round(q, 3)
        t2["goal_met"] = t2["ratio_sr_dpo_over_dpo_packed"] <= 1.1
        summary_block["T2_goal_met"] = t2["goal_met"]
        t2["shapes"] = {c.name: c.shapes for c in contenders if isinstance(c, JaxContender)}
        t2["goal"] = "Sr-DPO step / DPO step <= 1.1 (packed, the default), both with precomputed reference log-probs"
        t2["lambda"] = SR_LAM
        block["T2_sr_dpo_overhead"] = t2
        print(tag, "T2", json.dumps({k: v for k, v in t2.items() if not isinstance(v, dict)}), flush=True)
    return block, summary_block


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train.json"))
    ap.add_argument("--shapes", default="64x64,256x64", help="comma list of PROMPTxRESPONSE token shapes")
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
    ap.add_argument("--no-live", action="store_true", help="skip the live-reference contenders (T1 live mode)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 steps, fewer variants")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.t3_repeats, args.chunks, args.quiet_wait = 1, 2, 2, "4096", 0.0
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
    shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",") if sh]

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
    out = args.out
    previous = json.loads(out.read_text()) if out.is_file() else {}

    results: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} ({jax.default_backend()}), "
                   f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
                   f"{transformers.__version__}, trl {trl.__version__}",
        "model": {**MODEL, "dtype": "float32", "checkpoint": "prs_jax.models.tiny.build_checkpoint(seed=0), same "
                  "files for prs_jax and TRL (policy and reference)"},
        "optimizer": f"AdamW lr {LR}, constant, grad clip 1.0, weight decay 0; DPO sigmoid beta {BETA}",
        "protocol": {"rounds": args.rounds, "timed_steps_per_round": args.steps, "warmup_steps_per_round": 1,
                     "quick": args.quick,
                     "timing": "TRL: on_step_begin..on_step_end callbacks inside trainer.train() (fwd+bwd, clip, "
                               "AdamW, zero_grad; collation excluded). prs_jax: Trainer._train_step on a device batch "
                               "until outputs are ready (fwd+bwd, clip, AdamW). Contenders alternated per round; "
                               "medians of all timed steps; compile reported apart."},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    summary_block: dict = {}
    results["summary"] = summary_block
    results["shapes"] = {}

    def save():
        results["wall_s"] = round(time.perf_counter() - t_run, 1)
        out.write_text(json.dumps(results, indent=1))

    if "t1" not in skip or "t2" not in skip:
        for prompt_len, resp_len in shapes:
            tag = f"p{prompt_len}_r{resp_len}"
            block, summ = bench_shape(prompt_len, resp_len, args, ckpt, tok_dir, tmp, skip)
            results["shapes"][tag] = block
            summary_block[tag] = summ
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
    elif "T3_logprobs_vocab_128k" in previous:
        results["T3_logprobs_vocab_128k"] = dict(previous["T3_logprobs_vocab_128k"],
                                                 note=f"not rerun: kept from the run of {previous.get('date')}")
        for k, v in previous.get("summary", {}).items():
            if k.startswith("T3_"):
                summary_block[k] = v
        save()
    print("summary", json.dumps(summary_block), f"\nwrote {out} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
