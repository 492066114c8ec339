"""The README's main job: a preset of the reward_vs_n study (prs_jax.experiments.reward_vs_n) on the synthetic world.

It builds (or reuses) the world of one seed, prints its skill-gate table, then runs reward_vs_n with Rand, PRand
and PRS ((N/2, N/2) layers) at budgets N on held-out prompts in the PAIRED design (Rand and PRand select among
the first N of one stream of samples per prompt; PRS's first layer at N is PRand's first N/2 samples, then one
self-critique of the proxy-best draft and N/2 refinements), selecting with the proxy reward model and reporting
the GOLD reward beside the teacher ceiling (the teacher programs as the policy, gold selection). The declared
protocol (QUICKSTART_N) is evaluated on whatever world seeds were measured; `pool` pools several seeds' runs
without measuring. Everything it writes is reward_vs_n's: results.json / results.md, records.jsonl and
measure.json (the raw per-prompt records), reward_vs_n.png, effects.png, reward_distribution.png.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from prs_jax.config import check_ranges
from prs_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    """What the quickstart runs (mapped onto a reward_vs_n config by `study_config`)."""

    preset: str = "default"
    world_root: str = "runs/world"
    world_dir: str = ""  # an existing built world (e.g. `world build sft_steps=2800`): used instead of the preset,
    # and its seed becomes the sampling seed
    out_dir: str = "runs/quickstart"
    seed: int = 0  # the world's seed (and the sampling seed)
    prompts: int = 256
    budgets: tuple[int, ...] = (1, 2, 4, 8, 16)
    temperature: float = 1.0
    max_new_tokens: int = 40
    feedback_max_new_tokens: int = 40
    batch_size: int = 128  # prompts per batched engine call
    bootstrap: int = 2000
    allow_weak: bool = True  # the gate table is printed either way; False (--strict) stops on a failed gate

    def __post_init__(self) -> None:
        check_ranges(self, "", {"prompts": ">= 1", "temperature": "> 0", "max_new_tokens": ">= 1",
                                "feedback_max_new_tokens": ">= 1", "bootstrap": ">= 1", "batch_size": ">= 1"})
        if not self.budgets or any(n <= 0 for n in self.budgets):
            raise ConfigError(f"budgets must be positive integers (every N must be >= 1), got {list(self.budgets)}.")


def smoke_config(**overrides: Any) -> QuickstartConfig:
    """A CI-sized run (tiny world, few prompts, N up to 4): checks the pipeline, not the numbers."""
    return dataclasses.replace(QuickstartConfig(preset="smoke", out_dir="runs/quickstart-smoke", prompts=4,
                                                budgets=(1, 2, 4), max_new_tokens=24, feedback_max_new_tokens=16,
                                                batch_size=4, bootstrap=200), **overrides)


# The declared endpoints, at N = QUICKSTART_N: the design's positive controls (the teacher as the policy shows the
# PRS mechanism; the learned policy follows the preference), then the learned policy's claims (Holm over them).
QUICKSTART_N = 4
COMPARISONS = (("PRS", "PRand"), ("PRS", "Rand"), ("PRand", "Rand"))


def quickstart_protocol(budgets: tuple[int, ...], units: int) -> Any:
    from prs_jax.experiments.protocol import Endpoint, Protocol

    n = QUICKSTART_N if QUICKSTART_N in budgets else max(budgets)
    return Protocol(seeds=(0, 1, 2), units=units, endpoints=(
        Endpoint(f"teacher:PRS:PRand@{n}", f"the world rewards refinement over resampling (teacher, N={n})",
                 margin=0.1, control=True),
        Endpoint(f"gold:PRand:Rand@{n}", f"the policy follows the preference: PRand beats Rand at N={n}",
                 control=True),
        Endpoint(f"gold:PRS:PRand@{n}", f"PRS beats PRand at N={n} (proxy RM selects, gold reported)"),
        Endpoint(f"gold:PRS:Rand@{n}", f"PRS beats Rand at N={n}")))


def study_config(cfg: QuickstartConfig, seed: int | None = None) -> Any:
    """The reward_vs_n config the quickstart runs (`seed`: the sampling seed when it differs from cfg.seed, i.e.
    the seed of a named world_dir)."""
    from prs_jax.experiments.common import Source, WorldSpec
    from prs_jax.experiments.reward_vs_n import Config, Generation, Method

    world = WorldSpec(preset=cfg.preset, root=cfg.world_root, seed=cfg.seed, path=cfg.world_dir)  # type: ignore[arg-type]
    budgets = tuple(sorted(set(cfg.budgets)))
    return Config(source=Source("world", world), out_dir=cfg.out_dir,
                  seed=cfg.seed if seed is None else seed, prompts=cfg.prompts, budgets=budgets,
                  methods=(Method("Rand", "rand"), Method("PRand", "prand"), Method("PRS", "prs", split=0.5)),
                  generation=Generation(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                        feedback_max_new_tokens=cfg.feedback_max_new_tokens,
                                        batch_size=cfg.batch_size, min_rows_bucket=8),
                  comparisons=COMPARISONS, protocol=quickstart_protocol(budgets, cfg.prompts), n_boot=cfg.bootstrap)


def pooled_report(cfg: QuickstartConfig, dirs: list[str | Path], console: Console | None = None) -> dict[str, Any]:
    """Pool earlier quickstart runs (one OUT directory per world seed, the same quickstart config otherwise)
    under the declared protocol, measuring nothing: the first directory's records are copied into cfg.out_dir
    and the others pooled in (reward_vs_n.report_study)."""
    from prs_jax.experiments.common import load_measured
    from prs_jax.experiments.reward_vs_n import MEASURE_FACTS, RECORDS, report_study

    console = console or Console()
    if not dirs:
        raise ValueError("quickstart --pool: name at least one results directory.")
    first = Path(dirs[0])
    facts, _ = load_measured(first, "reward_vs_n", MEASURE_FACTS, RECORDS)
    out = Path(cfg.out_dir)
    if out.resolve() != first.resolve():
        out.mkdir(parents=True, exist_ok=True)
        for name in (MEASURE_FACTS, RECORDS):
            shutil.copyfile(first / name, out / name)
    from prs_jax.config import from_dict, to_dict
    from prs_jax.experiments.reward_vs_n import Config

    # report with the config the first directory was measured with, and the quickstart's declared protocol
    measured = facts["config"]
    study = from_dict(Config, {**measured, "out_dir": str(out), "pool_dirs": [str(d) for d in dirs[1:]],
                               "comparisons": [list(c) for c in COMPARISONS], "n_boot": cfg.bootstrap,
                               "protocol": to_dict(quickstart_protocol(tuple(measured["budgets"]),
                                                                       int(measured["prompts"])))})
    return report_study(study, console)


def run_quickstart(cfg: QuickstartConfig = QuickstartConfig(), console: Console | None = None) -> dict[str, Any]:
    """Build or load the world (its gate table printed; `allow_weak=False` stops on a failed gate), then
    reward_vs_n's measure and report with the quickstart preset. Returns the result record."""
    from prs_jax.experiments.reward_vs_n import measure_study, report_study
    from prs_jax.world.build import build_world, load_world, preset
    from prs_jax.world.gates import gate_table

    console = console or Console()
    t_start = time.perf_counter()
    if cfg.world_dir:
        built = load_world(cfg.world_dir, allow_weak=cfg.allow_weak, console=console)
    else:
        built = build_world(preset(cfg.preset, seed=cfg.seed), root=cfg.world_root,  # type: ignore[arg-type]
                            console=console, allow_weak=cfg.allow_weak)
    t_world = time.perf_counter() - t_start
    held = len(built.heldout())
    if held < cfg.prompts:
        console.print(f"quickstart: the world has {held} held-out prompts; using all of them (asked for "
                      f"{cfg.prompts}).", markup=False)
        cfg = dataclasses.replace(cfg, prompts=held)
    study = study_config(cfg, seed=built.config.seed)
    console.print(f"comparing Rand, PRand, PRS on {cfg.prompts} held-out prompts, N in {list(study.budgets)} "
                  "(paired: shared sample streams; the reward_vs_n study's quickstart preset)", markup=False)
    t0 = time.perf_counter()
    measure_study(study, console)
    t_measure = time.perf_counter() - t0
    result = report_study(study, console, started=t0)
    gates = built.report.get("gates") or {}
    if gates:
        console.print(gate_table(gates, title=f"skill gates of world {built.report['key']} (measured at build)"))
        failed = [g["gate"] for g in gates.get("rows", []) if g.get("passed") is False]
        if failed:
            console.print(f"[yellow]warning:[/] this world misses {len(failed)} skill gate(s) ({', '.join(failed)}): "
                          "an effect that depends on a missing skill is bounded by it; compare with the teacher "
                          "ceiling column. `--strict` stops here instead.")
    wall = time.perf_counter() - t_start
    console.print(f"results: {Path(study.out_dir) / 'results.json'} (tables in results.md, plots reward_vs_n.png and "
                  f"effects.png); world: {built.root} (policy, rm, tokenizer; try `prs-jax info {built.policy}`); "
                  f"world {t_world:.0f} s, measure {t_measure:.0f} s, {wall:.0f} s in all", markup=False)
    return result
