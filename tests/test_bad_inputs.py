"""Bad inputs through the `prs-jax` entry point, in process: each gives its exit code (2: usage, 1: runtime) and
one clear line naming what was wrong, never a traceback. Cases that need a model use the tiny fixtures and fail
in their checks before any generation (nothing compiles a decode)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from prs_jax.cli import main
from prs_jax.data.lock import OutputLock
from prs_jax.data.stamp import stamp_path, write_stamp

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "experiments" / "data" / "tiny_prompts.jsonl"
PAIRS = ROOT / "experiments" / "data" / "tiny_pairs.jsonl"
SFT = ROOT / "experiments" / "data" / "tiny_sft.jsonl"
LABEL_CFG = ROOT / "experiments" / "configs" / "label_tiny.yaml"
A2C_CFG = ROOT / "experiments" / "configs" / "train_a2c_tiny.yaml"


@dataclass
class Ctx:
    """Paths the cases use: checkpoints, good and broken input files, a scratch directory."""

    d: Path
    llama: Path
    rm32: Path  # a reward model with a 32-token window

    def file(self, name: str, text: str | bytes) -> str:
        """Write a scratch file and return its path."""
        path = self.d / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    def gen(self, *extra: str) -> list[str]:
        """A generate command line on the tiny prompts and the short-window RM."""
        return ["generate", f"policy={self.llama}", f"prompts={PROMPTS}", f"scorer.reward_model={self.rm32}",
                "scorer.formatter=template", "strategy.name=rand", "strategy.n=2", "strategy.max_new_tokens=4",
                *extra]

    def label(self, *extra: str) -> list[str]:
        """A label command line on the tiny pairs."""
        return ["label", str(LABEL_CFG), f"model={self.llama}", f"pairs={PAIRS}", *extra]

    def train(self, *extra: str, task: str = "sft") -> list[str]:
        """A train command line on the tiny SFT data."""
        return ["train", task, f"model={self.llama}", f"data.train={SFT}", f"trainer.out_dir={self.d / 'run'}",
                *extra]

    def sample(self, *extra: str, prompts: str | None = None, out: str | None = None) -> list[str]:
        """A sample command line."""
        return ["sample", str(self.llama), prompts or str(PROMPTS), "--out", out or str(self.d / "s.jsonl"), *extra]


@pytest.fixture(scope="module")
def ctx(llama_dir, make_checkpoint, tmp_path_factory) -> Ctx:
    return Ctx(tmp_path_factory.mktemp("bad"), llama_dir,
               make_checkpoint("llama", task="reward", max_position_embeddings=32))


LONG = " ".join(["word"] * 300)
ROW = json.dumps({"id": "p0", "prompt": "hi"})


def _held_lock(ctx: Ctx, name: str) -> list[str]:
    lock = OutputLock(ctx.d / name).acquire()
    ctx.__dict__.setdefault("locks", []).append(lock)  # held by this process until the module ends
    return [str(ctx.d / name)]


def _held_dir_lock(ctx: Ctx, name: str) -> str:
    (ctx.d / name).mkdir(exist_ok=True)
    return _held_lock(ctx, name)[0]


def _stamped(ctx: Ctx, name: str, config: dict) -> str:
    out = ctx.d / name
    out.write_text(ROW + "\n")
    write_stamp(stamp_path(out), config)
    return str(out)


def _one_prompt(ctx: Ctx, pid: str, text: str) -> str:
    return ctx.file(f"{pid}.jsonl", json.dumps({"id": pid, "prompt": text}) + "\n")


def _gen_stamp(ctx: Ctx, n: int) -> dict:
    from prs_jax.config import load_config
    from prs_jax.strategies.generate import GenerateConfig, row_config

    return row_config(load_config(GenerateConfig, None, ctx.gen(f"strategy.n={n}")[1:]))


Case = tuple[str, Callable[[Ctx], list[str]], int, str]
CASES: list[Case] = [
    # ------------------------------------------------------------------ the command line itself
    ("no-command", lambda c: [], 2, "usage: prs-jax"),
    ("unknown-command", lambda c: ["nosuch"], 2, "invalid choice"),
    ("sample-missing-args", lambda c: ["sample"], 2, "no checkpoint given"),
    ("train-unknown-task", lambda c: ["train", "ppo"], 2, "invalid choice"),
    ("info-stray-argument", lambda c: ["info", str(c.llama), "stray"], 2, "unrecognized arguments"),
    ("sample-n-not-int", lambda c: c.sample("--n", "abc"), 2, "invalid int value"),
    ("tiny-bad-model-type", lambda c: ["tiny", str(c.d / "t"), "--model-type", "mamba"], 2, "invalid choice"),
    ("world-bad-preset", lambda c: ["world", "build", "--preset", "huge"], 2, "invalid choice"),
    ("world-negative-sft-steps", lambda c: ["world", "build", "--preset", "smoke", "--root", str(c.d / "w"),
                                            "sft_steps=-1"], 1, "sft_steps must be positive"),
    ("world-zero-train-prompts", lambda c: ["world", "build", "--preset", "smoke", "--root", str(c.d / "w"),
                                            "train_prompts=0"], 1, "train_prompts must be positive"),
    ("world-probability-out-of-range", lambda c: ["world", "build", "--preset", "smoke", "--root", str(c.d / "w"),
                                                  "behaviour.attend=1.5"], 1, "behaviour.attend is a probability"),
    ("experiment-unknown-study", lambda c: ["experiment", "nosuch", "x.yaml"], 2, "invalid choice"),
    ("experiment-missing-config", lambda c: ["experiment", "reward_vs_n", str(c.d / "none.yaml")], 2,
     "config file not found"),
    ("quickstart-budgets-not-int", lambda c: ["quickstart", "--budgets", "1,two"], 2, "--budgets"),
    ("quickstart-budgets-zero", lambda c: ["quickstart", "--budgets", "0,2"], 2, "every N must be >= 1"),
    ("quickstart-zero-prompts", lambda c: ["quickstart", "--prompts", "0"], 2, "prompts (--prompts) must be >= 1"),
    ("quickstart-unknown-key", lambda c: ["quickstart", "temprature=0.5"], 2, "unknown key(s) temprature"),
    ("quickstart-yaml-bad-value", lambda c: ["quickstart", c.file("q.yaml", "max_new_tokens: 0\n")], 2,
     "q.yaml: max_new_tokens must be >= 1"),
    ("world-yaml-unknown-key", lambda c: ["world", "build", c.file("w.yaml", "policy:\n  hidden: 64\n"),
                                          "--preset", "smoke", "--root", str(c.d / "w")], 2,
     "w.yaml: unknown key(s) policy.hidden"),
    ("world-stray-word", lambda c: ["world", "build", "--preset", "smoke", "stray"], 2, "unexpected argument(s)"),
    ("tiny-zero-layers", lambda c: ["tiny", str(c.d / "t"), "--layers", "0"], 2, "--layers must be >= 1"),
    ("tiny-odd-hidden", lambda c: ["tiny", str(c.d / "t"), "--hidden", "30"], 2, "multiple of 8"),
    ("experiment-full-config-missing-checkpoints", lambda c: [
        "experiment", "reward_vs_n", str(ROOT / "experiments" / "configs" / "reward_vs_n" / "full.yaml")], 1,
     "do not exist"),
    # ------------------------------------------------------------------ info
    ("info-missing-dir", lambda c: ["info", str(c.d / "nope")], 1, "nope"),
    ("info-on-a-file", lambda c: ["info", c.file("f.txt", "x")], 1, "f.txt"),
    # ------------------------------------------------------------------ sample
    ("sample-missing-prompts", lambda c: c.sample(prompts=str(c.d / "none.jsonl")), 1, "prompts file not found"),
    ("sample-prompts-is-dir", lambda c: c.sample(prompts=str(c.d)), 1, "is a directory"),
    ("sample-n-zero", lambda c: c.sample("--n", "0"), 2, "n (--n) must be >= 1"),
    ("sample-batch-size-zero", lambda c: c.sample("--batch-size", "0"), 2, "batch_size (--batch-size) must be >= 1"),
    ("sample-max-new-tokens-zero", lambda c: c.sample("--max-new-tokens", "0"), 2, "max_new_tokens (--max-new-tokens) must be"),
    ("sample-temperature-zero", lambda c: c.sample("--temperature", "0"), 2, "sampling.temperature (--temperature) must be > 0"),
    ("sample-top-p-above-one", lambda c: c.sample("--top-p", "1.5"), 2, "sampling.top_p (--top-p) must be in (0, 1]"),
    ("sample-out-is-dir", lambda c: c.sample(out=str(c.d)), 1, "is a directory"),
    ("sample-out-under-a-file", lambda c: c.sample(out=c.file("plain.txt", "x") + "/o.jsonl"), 1,
     "is a file, not a directory"),
    ("sample-torn-line", lambda c: c.sample(prompts=c.file("torn.jsonl", ROW + '\n{"prompt": "cut\n')), 1,
     "torn.jsonl:2: invalid JSON"),
    ("sample-row-without-prompt", lambda c: c.sample(prompts=c.file("np.jsonl", ROW + '\n{"text": "x"}\n')), 1,
     "np.jsonl:2: each row needs a 'prompt'"),
    ("sample-empty-prompt", lambda c: c.sample(prompts=c.file("ep.jsonl", '{"prompt": ""}\n')), 1,
     "ep.jsonl:1: 'prompt' must be a non-empty string"),
    ("sample-empty-file", lambda c: c.sample(prompts=c.file("empty.jsonl", "\n\n")), 1, "no prompts"),
    ("sample-array-row", lambda c: c.sample(prompts=c.file("arr.jsonl", "[1, 2]\n")), 1,
     "arr.jsonl:1: expected a JSON object"),
    ("sample-prompt-too-long", lambda c: c.sample(prompts=c.file(
        "long.jsonl", json.dumps({"id": "big", "prompt": LONG}) + "\n")), 1, "prompt 'big'"),
    ("sample-missing-out", lambda c: ["sample", str(c.llama), str(PROMPTS)], 2, "no out given"),
    ("sample-stray-word", lambda c: c.sample("extra"), 2, "unexpected argument(s) 'extra'"),
    ("sample-unknown-key", lambda c: c.sample("sampling.top_q=0.5"), 2, "unknown key(s) sampling.top_q"),
    ("sample-key-wrong-type", lambda c: c.sample("n=many"), 2, "n: expected an integer"),
    ("sample-override-out-of-range", lambda c: c.sample("sampling.min_p=1"), 2, "sampling.min_p (--min-p) must be"),
    ("sample-yaml-missing", lambda c: ["sample", str(c.d / "none.yaml")], 2, "config file not found"),
    ("sample-yaml-unknown-key", lambda c: ["sample", c.file("bad.yaml", "checkpoint: x\nnum: 3\n")], 2,
     "bad.yaml: unknown key(s) num"),
    ("sample-yaml-not-first", lambda c: c.sample(c.file("late.yaml", "n: 2\n")), 2, "must come first"),
    ("sample-missing-checkpoint", lambda c: ["sample", str(c.d / "ckpt"), str(PROMPTS), "--out",
                                             str(c.d / "s.jsonl")], 1, "ckpt"),
    # ------------------------------------------------------------------ train
    ("train-no-model", lambda c: ["train", "sft", f"data.train={SFT}"], 2, "`model`"),
    ("train-no-data", lambda c: ["train", "sft", f"model={c.llama}"], 2, "`data.train`"),
    ("train-negative-lr", lambda c: c.train("optim.lr=-1"), 2, "optim.lr must be > 0"),
    ("train-negative-batch-size", lambda c: c.train("trainer.batch_size=-4"), 2, "trainer.batch_size must be >= 1"),
    ("train-zero-steps", lambda c: c.train("trainer.steps=0"), 2, "trainer.steps must be >= 1"),
    ("train-grad-accum-not-divisor", lambda c: c.train("trainer.grad_accum=3"), 2, "not divisible"),
    ("train-negative-warmup", lambda c: c.train("optim.warmup_steps=-1"), 2, "optim.warmup_steps"),
    ("train-zero-clip-norm", lambda c: c.train("optim.clip_norm=0"), 2, "optim.clip_norm must be > 0"),
    ("train-zero-max-length", lambda c: c.train("data.max_length=0"), 2, "data.max_length must be >= 1"),
    ("train-zero-beta", lambda c: c.train("loss.beta=0", task="dpo"), 2, "loss.beta must be > 0"),
    ("train-unknown-key", lambda c: c.train("foo.bar=1"), 2, "unknown key(s) foo"),
    ("train-wrong-type", lambda c: c.train("trainer.steps=abc"), 2, "trainer.steps: expected an integer"),
    ("train-missing-config-file", lambda c: ["train", "dpo", str(c.d / "none.yaml")], 2, "config file not found"),
    ("train-invalid-yaml", lambda c: ["train", "dpo", c.file("bad.yaml", "model: [unclosed\n")], 2, "invalid YAML"),
    ("train-yaml-not-mapping", lambda c: ["train", "dpo", c.file("list.yaml", "- 1\n- 2\n")], 2,
     "top level must be a mapping"),
    ("train-override-without-equals", lambda c: ["train", "dpo", c.file("ok.yaml", "model: x\n"), "justaword"], 2,
     "expected key=value"),
    ("train-missing-model-dir", lambda c: ["train", "sft", f"model={c.d / 'nomodel'}", f"data.train={SFT}"], 1,
     "nomodel"),
    ("train-missing-data-file", lambda c: ["train", "sft", f"model={c.llama}",
                                           f"data.train={c.d / 'none.jsonl'}"], 1, "no such file"),
    ("train-out-dir-is-file", lambda c: ["train", "sft", f"model={c.llama}", f"data.train={SFT}",
                                         "trainer.steps=1", f"trainer.out_dir={c.file('runfile', 'x')}"], 1,
     "must be a directory"),
    ("train-run-dir-locked", lambda c: ["train", "sft", f"model={c.llama}", f"data.train={SFT}", "trainer.steps=1",
                                        f"trainer.out_dir={_held_dir_lock(c, 'lockedrun')}"], 1,
     "another run is writing"),
    ("a2c-zero-rollout-n", lambda c: ["train", "a2c", str(A2C_CFG), f"model={c.llama}", "rollout.n=0"], 2,
     "rollout.n"),
    ("a2c-negative-beta", lambda c: ["train", "a2c", str(A2C_CFG), f"model={c.llama}", "a2c.beta=-1"], 2,
     "a2c.beta must be >= 0"),
    ("a2c-zero-max-prompts", lambda c: ["train", "a2c", str(A2C_CFG), f"model={c.llama}",
                                        "prompts.max_prompts=0"], 2, "prompts.max_prompts must be >= 1"),
    ("a2c-missing-reward-module", lambda c: ["train", "a2c", str(A2C_CFG), f"model={c.llama}",
                                             f"prompts.path={PROMPTS}", "reward.callable=no_such_mod:f"], 2,
     "reward.callable: cannot import module 'no_such_mod'"),
    ("a2c-prompt-too-long", lambda c: ["train", "a2c", str(A2C_CFG), f"model={c.llama}", "prompts.path=" +
                                       _one_prompt(c, "a2clong", LONG), f"trainer.out_dir={c.d / 'a2c'}"], 1,
     "a2c prompt 0"),
    # ------------------------------------------------------------------ generate
    ("generate-no-policy", lambda c: ["generate", f"prompts={PROMPTS}"], 2, "`policy`"),
    ("generate-zero-n", lambda c: c.gen("strategy.n=0"), 2, "strategy.n must be >= 1"),
    ("generate-zero-batch-size", lambda c: c.gen("batch_size=0"), 2, "batch_size must be >= 1"),
    ("generate-zero-temperature", lambda c: c.gen("strategy.temperature=0"), 2, "strategy.name=greedy"),
    ("generate-zero-top-p", lambda c: c.gen("strategy.top_p=0"), 2, "strategy.top_p must be in (0, 1]"),
    ("generate-zero-max-prompts", lambda c: c.gen("max_prompts=0"), 2, "max_prompts must be >= 1"),
    ("generate-unknown-strategy", lambda c: c.gen("strategy.name=beam"), 2, "strategy.name: 'beam' is not one of"),
    ("generate-callable-missing-module", lambda c: c.gen("scorer.reward_model=null", "scorer.callable=nosuch_mod:f",
                                                         f"out={c.d / 'g1.jsonl'}"), 2,
     "scorer.callable: cannot import module 'nosuch_mod'"),
    ("generate-callable-missing-function", lambda c: c.gen("scorer.reward_model=null", "scorer.callable=json:nosuch",
                                                           f"out={c.d / 'g2.jsonl'}"), 2, "has no attribute 'nosuch'"),
    ("generate-callable-bad-format", lambda c: c.gen("scorer.reward_model=null", "scorer.callable=json",
                                                     f"out={c.d / 'g3.jsonl'}"), 2, "expected 'package.module:name'"),
    ("generate-no-scorer", lambda c: c.gen("scorer.reward_model=null", f"out={c.d / 'g4.jsonl'}"), 2,
     "scorer: set `scorer.reward_model`"),
    ("generate-out-is-dir", lambda c: c.gen(f"out={c.d}"), 1, "is a directory"),
    ("generate-missing-prompts", lambda c: c.gen(f"prompts={c.d / 'none.jsonl'}", f"out={c.d / 'g5.jsonl'}"), 1,
     "no such file"),
    ("generate-torn-prompts", lambda c: c.gen(f"prompts={c.file('tp.jsonl', ROW + chr(10) + '{bad' + chr(10))}",
                                              f"out={c.d / 'g6.jsonl'}"), 1, "tp.jsonl:2: invalid JSON"),
    ("generate-output-locked", lambda c: c.gen(f"out={_held_lock(c, 'g7.jsonl')[0]}"), 1,
     f"another run is writing {{d}}/g7.jsonl (pid {os.getpid()})"),
    ("generate-stamp-differs", lambda c: c.gen("strategy.n=4", f"out={_stamped(c, 'g8.jsonl', _gen_stamp(c, 8))}"),
     1, "differing keys: strategy.n (strategy.n: 8 -> 4)"),
    ("generate-older-engine-shapes", lambda c: c.gen("strategy.n=8", "out=" + _stamped(
        c, "g8s.jsonl", {**_gen_stamp(c, 8), "engine_shape_scheme": "pow2"})), 1, "differing keys: engine_shape_scheme"),
    ("generate-broken-line-in-output", lambda c: c.gen(f"out={c.file('g9.jsonl', '{bad' + chr(10) + ROW + chr(10))}"),
     1, "g9.jsonl:1: invalid JSON"),
    ("generate-reward-model-window", lambda c: c.gen(f"out={c.d / 'g10.jsonl'}", "prompts=" + _one_prompt(
        c, "mid", " ".join(["word"] * 40))), 1, "prompt 'mid': the reward-model input"),
    ("generate-policy-window", lambda c: c.gen(f"out={c.d / 'g11.jsonl'}", "prompts=" + _one_prompt(c, "big", LONG)),
     1, "prompt 'big': prompt"),
    # ------------------------------------------------------------------ label
    ("label-no-model", lambda c: ["label", f"pairs={PAIRS}"], 2, "`model`"),
    ("label-zero-temperature", lambda c: c.label("labeler.temperature=0"), 2, "labeler.temperature must be > 0"),
    ("label-zero-cot-tokens", lambda c: c.label("labeler.cot_max_new_tokens=0"), 2,
     "labeler.cot_max_new_tokens must be >= 1"),
    ("label-self-consistency-without-cot", lambda c: c.label("labeler.self_consistency=2"), 2,
     "needs labeler.cot=true"),
    ("label-zero-batch-size", lambda c: c.label("batch_size=0"), 2, "batch_size must be >= 1"),
    ("label-missing-pairs", lambda c: c.label(f"pairs={c.d / 'none.jsonl'}", f"out={c.d / 'l1.jsonl'}"), 1,
     "no such file"),
    ("label-no-response-columns", lambda c: c.label(f"pairs={c.file('nc.jsonl', ROW + chr(10))}",
                                                    f"out={c.d / 'l2.jsonl'}"), 1, "no response columns"),
    ("label-out-is-dir", lambda c: c.label(f"out={c.d}"), 1, "is a directory"),
    ("label-output-locked", lambda c: c.label(f"out={_held_lock(c, 'l3.jsonl')[0]}"), 1, "another run is writing"),
    ("label-broken-line-in-output", lambda c: c.label(f"out={c.file('l4.jsonl', '{bad' + chr(10) + ROW + chr(10))}"),
     1, "l4.jsonl:1: invalid JSON"),
    ("label-pair-too-long", lambda c: c.label(f"out={c.d / 'l5.jsonl'}", "pairs=" + c.file("lp.jsonl", json.dumps(
        {"id": "huge", "prompt": LONG, "chosen": "a", "rejected": "b"}) + "\n")), 1, "pair 'huge'"),
    # ------------------------------------------------------------------ merge
    ("merge-no-parts", lambda c: ["merge", str(c.d / "m.jsonl")], 1, "no part files"),
]


def _non_utf8_case(ctx: Ctx) -> list[str]:
    return ctx.sample(prompts=ctx.file("latin1.jsonl", (ROW + "\n").encode() * 29 + b'{"prompt": "caf\xe9"}\n'))


CASES.append(("sample-non-utf8-line-30", _non_utf8_case, 1, "latin1.jsonl:30: not UTF-8"))


def test_enough_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,argv,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(ctx, capsys, name, argv, code, fragment):
    got = main(argv(ctx))
    out = capsys.readouterr()
    text = out.out + out.err
    assert got == code, text[-2000:]
    assert fragment.replace("{d}", str(ctx.d)) in text, text[-2000:]
    assert "Traceback" not in text
    if os.environ.get("SHOW_ERRORS"):
        print(f"{name}: {code}: {text.strip().splitlines()[-1] if text.strip() else text}", file=sys.__stderr__)
    if code and name != "no-command":
        errors = [line for line in out.err.splitlines() if "error:" in line]
        assert len(errors) == 1, out.err[-2000:]


def test_debug_shows_the_traceback(ctx):
    with pytest.raises(Exception, match="optim.lr must be > 0"):
        main(["--debug", *ctx.train("optim.lr=-1")])


def test_sample_bad_argument_keeps_existing_output(ctx, capsys):
    out = ctx.d / "keep.jsonl"
    out.write_text('{"prompt": "x", "completions": []}\n')
    before = out.read_bytes()
    assert main(ctx.sample("--n", "0", out=str(out))) == 2
    assert main(ctx.sample(prompts=str(ctx.d / "missing.jsonl"), out=str(out))) == 1
    assert out.read_bytes() == before
    assert not (ctx.d / "keep.jsonl.tmp").exists()
    capsys.readouterr()


def test_refused_resume_leaves_the_output_and_its_provenance(ctx, capsys):
    out = _stamped(ctx, "prov.jsonl", _gen_stamp(ctx, 8))
    before = Path(out).read_bytes()
    assert main(ctx.gen("strategy.n=4", f"out={out}")) == 1
    assert "differing keys: strategy.n" in capsys.readouterr().err
    assert Path(out).read_bytes() == before and not (ctx.d / "prov.config.json").exists()
    assert json.loads(stamp_path(out).read_text())["config"]["strategy"]["n"] == 8
