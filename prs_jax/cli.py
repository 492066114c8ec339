"""The `prs-jax` command line: one subcommand per stage (later stages add theirs here)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prs_jax.errors import ConfigError, PrsJaxError


def _cmd_info(args: argparse.Namespace) -> int:
    import jax
    from flax import nnx
    from rich.console import Console
    from rich.table import Table

    from prs_jax.models import from_pretrained
    from prs_jax.models.tokenizer import has_chat_template, load_tokenizer
    from prs_jax.models.transformer import RewardModel

    model = from_pretrained(args.checkpoint, dtype=args.dtype)
    cfg = model.config
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params)
    n_params = sum(int(x.size) for x in leaves)
    dtypes = sorted({str(x.dtype) for x in leaves})
    table = Table(title=str(args.checkpoint), show_header=False)
    kind = f"reward model (head '{model.head_name}', {model.num_labels} label(s))" if isinstance(
        model, RewardModel) else "causal LM"
    rows = [
        ("architecture", f"{cfg.model_type} ({cfg.family} family), {kind}"),
        ("parameters", f"{n_params:,}"),
        ("dtype", ", ".join(dtypes)),
        ("layers", str(cfg.num_hidden_layers)),
        ("hidden / intermediate", f"{cfg.hidden_size} / {cfg.intermediate_size}"),
        ("heads / kv heads / head dim", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} / {cfg.head_dim}"),
        ("vocab", str(cfg.vocab_size)),
        ("context", str(cfg.max_position_embeddings)),
        ("rope", f"{cfg.rope.rope_type}, theta={cfg.rope.theta:g}, rotary dims={cfg.rotary_dim}"),
        ("tied embeddings", str(cfg.tie_word_embeddings)),
    ]
    if cfg.sliding_window:
        rows.append(("sliding window", str(cfg.sliding_window)))
    try:
        tok = load_tokenizer(args.checkpoint)
        rows.append(("tokenizer", f"{type(tok).__name__}, {len(tok)} tokens, chat template: "
                                  f"{'yes' if has_chat_template(tok) else 'no'}"))
    except (PrsJaxError, ValueError) as e:
        rows.append(("tokenizer", f"none ({e})"))
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    return 0


QUICKSTART_FLAGS = {"out_dir": "out", "world_root": "world-root", "prompts": "prompts", "seed": "seed"}


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from prs_jax.config import load_config, to_dict
    from prs_jax.world.quickstart import QuickstartConfig, smoke_config

    config, overrides, _ = split_words(args.overrides, "quickstart")
    shortcuts = flag_overrides(args, QUICKSTART_FLAGS)
    if args.budgets:
        try:
            budgets = [int(n) for n in args.budgets.split(",")]
        except ValueError:
            raise ConfigError(f"--budgets: expected comma-separated integers such as 1,2,4,8, got "
                              f"{args.budgets!r}.") from None
        shortcuts.append(f"budgets={json.dumps(budgets)}")
    if args.strict:
        shortcuts.append("allow_weak=false")
    base = smoke_config() if args.smoke else QuickstartConfig()
    try:
        cfg = load_config(QuickstartConfig, config, [*shortcuts, *overrides], defaults=to_dict(base))
    except ConfigError as e:
        msg = str(e)
        for key, flag in (*QUICKSTART_FLAGS.items(), ("budgets", "budgets")):
            msg = msg.replace(f"{key} must", f"{key} (--{flag}) must")
        raise ConfigError(msg) from None
    from prs_jax.world.gates import GateError
    from prs_jax.world.quickstart import pooled_report, run_quickstart

    if args.pool:
        try:
            pooled_report(cfg, [d for d in args.pool.split(",") if d])
        except (FileNotFoundError, ValueError) as e:
            print(f"prs-jax quickstart --pool: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        run_quickstart(cfg)
    except GateError as e:
        print(f"prs-jax quickstart: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from rich.console import Console

    from prs_jax.experiments import run_experiment

    run_experiment(args.name, args.config, args.overrides, console=Console(), report_only=args.report)
    return 0


def _cmd_world(args: argparse.Namespace) -> int:
    from prs_jax.config import load_config, to_dict
    from prs_jax.world.build import WorldConfig, build_world, preset

    config, overrides, _ = split_words(args.overrides, f"world {args.action}")
    seed = [f"seed={args.seed}"] if args.seed is not None else []  # the flag wins over the YAML file's seed
    cfg = load_config(WorldConfig, config, [*seed, *overrides], defaults=to_dict(preset(args.preset)))
    from prs_jax.world.gates import GateError

    try:
        built = build_world(cfg, root=args.root, force=args.force, allow_weak=args.allow_weak)
        if args.action == "labelers":
            from prs_jax.world.labelers import build_labelers

            report = build_labelers(built, allow_weak=args.allow_weak)
            print(json.dumps({"root": str(built.root), "labelers": report["paths"],
                              "gates": {g["gate"]: g["value"] for g in report["gates"]["rows"]}}, indent=2))
            return 0
    except GateError as e:
        print(f"prs-jax world {args.action}: {e}", file=sys.stderr)
        return 1
    gates = (built.report.get("gates") or {}).get("rows", [])
    print(json.dumps({"root": str(built.root), "policy": str(built.policy), "reward_model": str(built.reward_model),
                      "rm_heldout_accuracy": built.report.get("rm_heldout_accuracy"),
                      "gates_failed": [g["gate"] for g in gates if g.get("passed") is False],
                      "timings": built.report.get("timings")}, indent=2))
    return 0


def split_words(words: Sequence[str], command: str, *, positionals: Sequence[str] = ()
                ) -> tuple[Path | None, list[str], dict[str, str]]:
    """The words after a subcommand -> (YAML config path, dotted key=value overrides, {positional name: word}).

    One configuration style for every command: an optional YAML file first (a word ending in .yaml / .yml),
    then key=value overrides; a command may name a few plain positionals as shortcuts for keys (`sample`'s
    CKPT PROMPTS)."""
    config: Path | None = None
    overrides: list[str] = []
    plain: list[str] = []
    for i, word in enumerate(words):
        if word.endswith((".yaml", ".yml")) and "=" not in word:
            if config is not None or overrides or plain:
                raise ConfigError(f"{command}: the YAML config must come first and only once, got {word!r} after "
                                  f"{' '.join(words[:i])!r}.")
            config = Path(word)
            if not config.is_file():
                raise ConfigError(f"{config}: config file not found.")
        elif "=" in word and not Path(word).exists():
            overrides.append(word)
        else:
            plain.append(word)
    if len(plain) > len(positionals):
        expected = " ".join(p.upper() for p in positionals) or "no plain words"
        raise ConfigError(f"{command}: unexpected argument(s) {' '.join(plain[len(positionals):])!r}; expected "
                          f"[CONFIG.yaml] {expected} [key=value ...].")
    return config, overrides, dict(zip(positionals, plain))


def flag_overrides(args: argparse.Namespace, keys: dict[str, str]) -> list[str]:
    """key=value overrides for the shortcut flags that were given ({config key: flag name}); None = not given."""
    out = []
    for key, flag in keys.items():
        value = getattr(args, flag.replace("-", "_"), None)
        if value is None:
            continue
        out.append(f"{key}={json.dumps(value)}")
    return out


def _cmd_sample(args: argparse.Namespace) -> int:
    from prs_jax.config import load_config
    from prs_jax.tree.sample_run import FLAG_KEYS, SampleRunConfig, run_sample_config

    config, overrides, plain = split_words(args.overrides, "sample", positionals=("checkpoint", "prompts"))
    args.raw = False if args.raw else None  # --raw is the shortcut for chat=false
    args.stop = args.stop or None
    args.greedy = True if args.greedy else None
    shortcuts = [f"{k}={json.dumps(v)}" for k, v in plain.items()] + flag_overrides(args, FLAG_KEYS)
    try:
        cfg = load_config(SampleRunConfig, config, [*shortcuts, *overrides])
    except ConfigError as e:  # name the flag beside the key when a shortcut flag exists
        msg = str(e)
        for key, flag in FLAG_KEYS.items():
            if key != "chat":
                msg = msg.replace(f"{key} must", f"{key} (--{flag}) must")
        raise ConfigError(msg) from None
    n = run_sample_config(cfg)
    print(f"wrote {n} rows to {cfg.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from prs_jax.config import load_config
    from prs_jax.train.run import TrainRunConfig, run_train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in str(config) and not config.exists():  # no file given, only overrides
        config, overrides = None, [str(config)] + overrides
    if args.force_resume:
        overrides.append("trainer.force_resume=true")
    if args.task == "a2c":
        from prs_jax.train.a2c import A2CRunConfig, run_a2c

        run_a2c(load_config(A2CRunConfig, config, overrides))
        return 0
    cfg = load_config(TrainRunConfig, config, overrides)
    run_train(args.task, cfg)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from prs_jax.config import load_config
    from prs_jax.strategies.generate import (
        GenerateConfig,
        merge_parts,
        read_prompt_items,
        run_generate,
    )

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in str(config) and not config.exists():
        config, overrides = None, [str(config)] + overrides
    cfg = load_config(GenerateConfig, config, overrides)
    index, count = 0, 1
    if args.num_processes > 1:
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
        index, count = jax.process_index(), jax.process_count()
    out = run_generate(cfg, process_index=index, process_count=count)
    print(f"wrote {out}")
    if count > 1:
        import jax
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("prs_jax_generate_done")
        if index == 0:
            merged = merge_parts(cfg.out, [it.id for it in read_prompt_items(cfg)])
            print(f"merged parts into {merged}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from prs_jax.strategies.generate import merge_parts

    print(f"merged into {merge_parts(args.out)}")
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from prs_jax.config import load_config
    from prs_jax.feedback.run import LabelRunConfig, format_summary, run_label

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in str(config) and not config.exists():
        config, overrides = None, [str(config)] + overrides
    out, summary = run_label(load_config(LabelRunConfig, config, overrides))
    print(format_summary(summary))
    print(f"wrote {out}")
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from prs_jax.models.tiny import build_checkpoint

    for flag, value in (("--hidden", args.hidden), ("--layers", args.layers), ("--context", args.context)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}.")
    if args.hidden % 8:
        raise ConfigError(f"--hidden must be a multiple of 8 (4 heads of an even size), got {args.hidden}.")
    out = build_checkpoint(args.out, args.model_type, seed=args.seed, task=args.task, hidden_size=args.hidden,
                           intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                           max_position_embeddings=args.context)
    print(f"wrote a random {args.model_type} {args.task} checkpoint to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `prs-jax` with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="prs-jax",
        description="prs_jax: tree-expansion sampling (PRS, best-of-N, verbalized sampling), Sr-DPO/Sr-IPO and "
                    "RLAIF on Flax NNX models loaded from Hugging Face checkpoints.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _sub(sub, "info", help="print a checkpoint's architecture, parameter count and dtype")
    p.add_argument("checkpoint", type=Path, help="local Hugging Face checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_cmd_info)

    p = _sub(sub, "sample", help="n completions per prompt of a JSONL file, on the tree engine")
    p.add_argument("overrides", nargs="*", metavar="[CONFIG.yaml] [CKPT PROMPTS] [key=value ...]",
                   help="an optional YAML run config, the checkpoint and prompts (shortcuts for checkpoint=... "
                        "prompts=...) and dotted overrides such as n=8 sampling.top_p=0.9; the flags below are "
                        "shortcuts for keys (SampleRunConfig in prs_jax/tree/sample_run.py)")
    p.add_argument("--out", default=None, help="output JSONL (input row + 'completions'); key out")
    p.add_argument("--n", type=int, default=None, help="completions per prompt, sharing the prompt KV (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128")
    p.add_argument("--temperature", type=float, default=None, help="key sampling.temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("--greedy", action="store_true", help="key sampling.greedy=true")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); key stop")
    p.add_argument("--raw", action="store_true", help="use 'prompt' as raw text, not a user chat turn; chat=false")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="prompts per engine call (default 16)")
    p.set_defaults(func=_cmd_sample)

    p = _sub(sub, "train", help="train a policy (sft, dpo family incl. Sr-DPO/Sr-IPO, a2c RL against a reward) "
                                     "or a reward model (rm)")
    p.add_argument("task", choices=["sft", "rm", "dpo", "a2c"])
    p.add_argument("config", type=Path, nargs="?", default=None, help="YAML run config (experiments/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loss.name=sr_dpo optim.lr=1e-5")
    p.add_argument("--force-resume", action="store_true",
                   help="resume a run directory even though its model / data / loss / optimizer config changed")
    p.set_defaults(func=_cmd_train)

    p = _sub(sub, "generate", help="run a strategy (prs, rand, prand, greedy) over prompts; restartable JSONL")
    p.add_argument("config", type=Path, nargs="?", default=None, help="YAML config (experiments/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. strategy.n=32")
    p.add_argument("--coordinator", default="localhost:12355", help="jax.distributed coordinator (multi-process)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = _sub(sub, "merge", help="merge the per-process part files of a generate run")
    p.add_argument("out", type=Path, help="the run's `out` path")
    p.set_defaults(func=_cmd_merge)

    p = _sub(sub, "label", help="AI preference labels (RLAIF) for response pairs: soft labels, restartable JSONL")
    p.add_argument("config", type=Path, nargs="?", default=None, help="YAML config (experiments/configs/label_*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. labeler.cot=true")
    p.set_defaults(func=_cmd_label)

    p = _sub(sub, "tiny", help="write a random tiny HF checkpoint (with a local tokenizer) for experiments")
    p.add_argument("out", type=Path)
    p.add_argument("--model-type", default="llama", choices=["llama", "mistral", "qwen2", "qwen3", "gpt_neox"])
    p.add_argument("--task", default="causal_lm", choices=["causal_lm", "reward"])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny)

    p = _sub(sub, "quickstart", help="the main job: build (or reuse) the synthetic world and compare PRS, Rand "
                                     "and PRand at N=1..16 by the gold reward, paired, with 95%% CIs and the "
                                     "teacher ceiling (table + PNG)")
    p.add_argument("overrides", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="an optional YAML config and dotted overrides of QuickstartConfig "
                        "(prs_jax/world/quickstart.py), e.g. temperature=0.8; the flags are shortcuts for keys")
    p.add_argument("--out", default=None, help="output directory for results, records and plots (default "
                                               "runs/quickstart; --smoke: runs/quickstart-smoke)")
    p.add_argument("--world-root", default=None, help="where built worlds are cached (default runs/world)")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts to evaluate")
    p.add_argument("--budgets", default=None, help="comma-separated N values, e.g. 1,2,4,8,16")
    p.add_argument("--seed", type=int, default=None, help="world seed (independent worlds; defaults 0, 1, 2)")
    p.add_argument("--strict", action="store_true", help="stop (exit 1) if the world misses a skill gate; by "
                                                          "default the gate table is printed with a warning")
    p.add_argument("--smoke", action="store_true", help="tiny world and sizes for CI (checks the pipeline only)")
    p.add_argument("--pool", default=None, metavar="DIR,DIR,...",
                   help="measure nothing: pool the per-prompt records of earlier runs (one results directory per "
                        "world seed) into per-seed and pooled effects with 95%% CIs, Holm p and a verdict per claim "
                        "(results.json / results.md in --out)")
    p.set_defaults(func=_cmd_quickstart)

    from prs_jax.experiments import STUDIES

    p = _sub(sub, "experiment", help="run a study (results JSON + markdown table + PNG): " + ", ".join(STUDIES))
    p.add_argument("name", choices=STUDIES)
    p.add_argument("config", type=Path, help="YAML config, e.g. experiments/configs/reward_vs_n/cpu.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--report", action="store_true", help="remake tables, plots and results.json from the saved "
                                                         "records in out_dir without measuring (reward_vs_n, sr_dpo)")
    p.set_defaults(func=_cmd_experiment)

    p = _sub(sub, "world", help="the synthetic preference world: `world build` trains (or reuses) its "
                                "tokenizer, policy and proxy reward model and measures its skill gates; "
                                "`world labelers` also trains its three separate AI labelers")
    p.add_argument("action", choices=["build", "labelers"])
    p.add_argument("overrides", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="an optional YAML file and dotted WorldConfig overrides over the preset, e.g. sft_steps=800 "
                        "policy.hidden_size=96")
    p.add_argument("--preset", default="default", choices=["default", "smoke"])
    p.add_argument("--root", default="runs/world", help="cache directory of built worlds")
    p.add_argument("--seed", type=int, default=None, help="world seed (shortcut for seed=S; default 0)")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    p.add_argument("--allow-weak", action="store_true", help="keep and use a world that misses a skill gate "
                                                            "(the build otherwise exits 1 naming the gate)")
    p.set_defaults(func=_cmd_world)
    return parser


def _sub(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser that also takes --debug (after the subcommand)."""
    p = sub.add_parser(name, **kwargs)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; key=value words after an option are overrides too."""
    args, extra = parser.parse_known_args(argv)
    # argparse fills a trailing `overrides` positional before it reads the options, so the words after an option
    # (`world build --preset default sft_steps=10`, `sample --out o.jsonl CKPT PROMPTS`) arrive here; they are
    # the command's words all the same (each command checks its words: key=value, a YAML file, a positional)
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _os_message(e: OSError) -> str:
    what = {FileNotFoundError: "not found; check the path", PermissionError: "permission denied; check the "
            "permissions or choose another path", IsADirectoryError: "is a directory; a file path is expected",
            NotADirectoryError: "a part of the path is a file, not a directory; check the path"}
    hint = next((h for t, h in what.items() if isinstance(e, t)), None)
    if e.filename is not None:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{where}: {hint or e.strerror or e}"
    return str(e) if str(e) else type(e).__name__


def describe_error(e: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an error reaching the top: 2 for usage errors (a bad config, option or
    override), 1 for runtime failures (data, checkpoints, files, locks, imports, training)."""
    if isinstance(e, ConfigError):
        return 2, str(e)
    if isinstance(e, PrsJaxError):
        return 1, str(e)
    if isinstance(e, OSError):
        return 1, _os_message(e)
    if isinstance(e, ImportError):
        name = f" {e.name!r}" if e.name else ""
        return 1, f"cannot import{name}: {e}; install the missing package (pip install -e '.[test]' installs all)."
    if isinstance(e, ValueError):
        return 1, str(e)
    return 1, (f"internal error: {type(e).__name__}: {e} (a bug in prs-jax; rerun with --debug for the traceback "
               "and report it)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `prs-jax` console script: one clear line per error (--debug: the traceback)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    try:
        args = parse_args(parser, argv)
    except SystemExit as e:  # argparse printed the usage error (code 2) or the help (code 0)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    start = time.perf_counter()
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print(f"prs-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        code, message = describe_error(e)
        message = " ".join(str(message).split()) if "\n" not in str(message).strip() else str(message).strip()
        print(f"prs-jax {args.command}: error: {message}", file=sys.stderr)
        return code
    if args.command != "info":
        print(f"[prs-jax {args.command}] done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
