"""Shared pieces of the experiment scripts: where the policy / reward / prompts come from (the synthetic world or
real HF checkpoints and prompt sets), the result record (config, git commit, seed, versions, wall time), markdown
tables and plots.

Every study is `prs_jax/experiments/<name>.py` with a typed `Config` and `run(cfg, console) -> Record`; configs
live in `experiments/configs/<name>/{smoke,cpu,full}.yaml`; `prs-jax experiment NAME CONFIG [key=value ...]`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from prs_jax.config import to_dict


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """Which synthetic world to use (built or reused from the cache): a preset plus WorldConfig overrides
    (dotted keys, e.g. {"policy.hidden_size": 96, "sft_steps": 300})."""

    preset: Literal["default", "smoke"] = "default"
    root: str = "runs/world"
    seed: int = 0
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # an already built world directory (runs/world/world-KEY) to load as it is, whatever its version: never
    # builds; preset / seed / overrides are then not used (the world's own report.json says what it is)
    path: str = ""


@dataclasses.dataclass(frozen=True)
class RealSpec:
    """Real checkpoints for the `full` configs: policy and reward-model directories and a prompt set
    (prs_jax.data.prompt_sets.load_prompt_set name + path). No gold reward exists there: studies report the RM."""

    policy: str = ""
    reward_model: str = ""
    rm_head_name: str | None = None
    prompt_set: str = "alpaca_eval"
    prompts_path: str = ""
    max_prompts: int | None = None
    dtype: Literal["float32", "bfloat16"] = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a study draws its models and prompts from."""

    kind: Literal["world", "real"] = "world"
    world: WorldSpec = WorldSpec()
    real: RealSpec = RealSpec()


# config keys whose string values name local checkpoint directories (always local) or data sources (a local file,
# or a data set name that `datasets` resolves offline, as prs_jax.data.io.iter_rows reads them)
CHECKPOINT_KEYS = frozenset({"policy", "reward_model", "model", "labeler", "embedder_model"})
DATA_KEYS = frozenset({"prompts_path", "eval_prompts_path", "train_file", "eval_file", "pairs", "exemplars"})


def missing_paths(cfg: Any) -> list[tuple[str, str]]:
    """(dotted key, path) of every checkpoint or data-file entry of the config that does not exist (pure walk)."""
    from prs_jax.data.io import names_a_file  # iter_rows' own rule: a file, or maybe a data set name

    out: list[tuple[str, str]] = []

    def walk(v: Any, key: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                name = f"{key}.{k}" if key else str(k)
                if isinstance(x, str) and x and (k in CHECKPOINT_KEYS or (k in DATA_KEYS and names_a_file(x))):
                    if not Path(x).exists():
                        out.append((name, x))
                else:
                    walk(x, name)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{key}[{i}]")

    walk(to_dict(cfg), "")
    return out


def preflight(cfg: Any, config_path: str | Path | None = None) -> None:
    """Before a study on real checkpoints starts, fail at once (not hours in) if a checkpoint or data path is
    missing, naming every one."""
    source = getattr(cfg, "source", None)
    if source is None or getattr(source, "kind", "world") != "real":
        return
    missing = missing_paths(cfg)
    if missing:
        where = f" in {config_path}" if config_path else ""
        lines = "\n".join(f"  {k}: {p}" for k, p in missing)
        raise FileNotFoundError(
            f"{len(missing)} path(s){where} do not exist (relative paths are read from {Path.cwd()}):\n{lines}\n"
            "Put the HF checkpoint directories (config.json, *.safetensors, tokenizer files) and data files there "
            "(experiments/README.md, 'Full configs', lists what each study needs), or override a key on the "
            "command line: prs-jax experiment NAME CONFIG source.real.policy=/my/ckpt ...")


def build_world_from(spec: WorldSpec, console: Any = None):
    """Build or reuse the world of `spec` (prs_jax.world.build)."""
    from prs_jax.config import apply_overrides, from_dict
    from prs_jax.world.build import WorldConfig, build_world, load_world, preset

    if spec.path:
        return load_world(spec.path, allow_weak=True, console=console)
    cfg = preset(spec.preset, seed=spec.seed)
    if spec.overrides:
        cfg = from_dict(WorldConfig, apply_overrides(to_dict(cfg), [f"{k}={json.dumps(v)}" for k, v in
                                                                     spec.overrides.items()]))
    # a study reports on whatever world it gets; the missed gates are in the world's report.json (and printed
    # at build), and turning them into per-claim verdicts ("untestable here") is the studies' protocol
    return build_world(cfg, root=spec.root, console=console, allow_weak=True)


def param_count(model: Any) -> int:
    """Number of parameters (nnx.Param leaves) of a Flax NNX model."""
    import jax
    from flax import nnx

    return int(sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_dirty(exclude: str | Path | None = None, repo: str | Path | None = None) -> bool | None:
    """Whether the checkout (`repo`, default: the one this package runs from) has uncommitted changes to tracked
    files outside `exclude` (a study's own output directory, which it rewrites); None outside a git checkout. A
    result made from a dirty tree is not exactly reproducible from its commit."""
    cwd = Path(repo) if repo is not None else Path(__file__).parents[2]
    try:
        top = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                                  check=True, cwd=cwd).stdout.strip()).resolve()
        # git refuses a pathspec outside the work tree; an output directory there cannot make the tree dirty
        spec = ([f":(exclude){Path(exclude).resolve()}"]
                if exclude is not None and Path(exclude).resolve().is_relative_to(top) else [])
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *spec],
                             capture_output=True, text=True, check=True, cwd=top).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(out.strip())


def versions() -> dict[str, str]:
    """Versions of the packages that shape a result."""
    out = {}
    for pkg in ("prs-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers",
                "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out




def load_measured(d: str | Path, study: str, facts_name: str = "measure.json", records_name: str = "records.jsonl"
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A study's measure-time facts and its per-unit records from OUT directory `d` (what `report` reads)."""
    d = Path(d)
    facts_file, records_file = d / facts_name, d / records_name
    if not facts_file.is_file() or not records_file.is_file():
        raise FileNotFoundError(f"{d}: no {facts_name} / {records_name}; measure first (prs-jax experiment {study} "
                                "CONFIG, without --report).")
    with records_file.open(encoding="utf-8") as fh:
        return json.loads(facts_file.read_text()), [json.loads(line) for line in fh if line.strip()]


def _without(config: dict[str, Any], dotted: Sequence[str]) -> dict[str, Any]:
    """A deep copy of `config` without the dotted keys (e.g. "source.world.seed")."""
    out = json.loads(json.dumps(config))
    for key in dotted:
        *path, last = key.split(".")
        d = out
        for part in path:
            d = d.get(part) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.pop(last, None)
    return out


def measured_config(cfg: Any, not_measured: Sequence[str]) -> dict[str, Any]:
    """A study config as plain JSON without the `not_measured` top-level keys: what measure.json records as the
    config that decided the records, and what a report must match (pool_measured)."""
    return json.loads(json.dumps({k: v for k, v in to_dict(cfg).items() if k not in not_measured}, default=str))


def pool_measured(out_dir: str | Path, pool_dirs: Sequence[str], config: dict[str, Any], study: str,
                  pool_free: Sequence[str] = ("source.world.seed",), facts_name: str = "measure.json",
                  records_name: str = "records.jsonl", ignore: Sequence[str] = ()
                  ) -> tuple[dict[int, dict[str, Any]], dict[int, list[dict[str, Any]]]]:
    """The measure-time facts and the records of every world seed, keyed by seed (out_dir's seed first):
    `out_dir` plus `pool_dirs` (one OUT per world seed, measured with the same study config apart from the
    dotted `pool_free` keys, e.g. the world seed). `config` is the measured config of the report's study config;
    `out_dir` must have been measured with exactly it, apart from the dotted `ignore` keys (settings that do not
    decide the records, e.g. a cache directory)."""
    facts, records = load_measured(out_dir, study, facts_name, records_name)
    config, theirs0 = _without(config, ignore), _without(facts["config"], ignore)
    diff = sorted(k for k in set(config) | set(theirs0) if config.get(k) != theirs0.get(k))
    if diff:
        raise ValueError(f"{Path(out_dir) / facts_name}: measured with another config (keys {', '.join(diff)} "
                         "differ); report with the config it was measured with, or measure again.")
    seed0 = int(facts.get("world_seed") or 0)
    facts_by, by_seed = {seed0: facts}, {seed0: records}
    mine = _without(config, pool_free)
    for d in pool_dirs:
        f2, r2 = load_measured(d, study, facts_name, records_name)
        theirs = _without(f2["config"], pool_free)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(f"{d}: measured with another study config (keys {', '.join(diff)} differ beyond "
                             f"{', '.join(pool_free)}); pool only OUT directories of the same config on different "
                             "world seeds.")
        s = int(f2.get("world_seed") or 0)
        if s in by_seed:
            raise ValueError(f"{d}: world seed {s} is already pooled (from another directory); one OUT per seed.")
        facts_by[s], by_seed[s] = f2, r2
    return facts_by, by_seed


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".3f") -> str:
    """A GitHub markdown table; floats formatted with `floatfmt`."""
    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Record:
    """What a study writes: results JSON (with config, commit, seed, versions, wall time), markdown, plots."""

    def __init__(self, name: str, config: Any, out_dir: str | Path, seed: int):
        self.name, self.config, self.seed = name, config, seed
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {}
        self.tables: list[tuple[str, str]] = []
        self.figures: list[Path] = []
        self.notes: list[str] = []
        self._t0 = time.perf_counter()

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
        """Add a markdown table (also printed by `finish`)."""
        md_ = markdown_table(headers, rows)
        self.tables.append((title, md_))
        return md_

    def figure(self, filename: str, draw: Callable[[Any], None], figsize: tuple[float, float] = (6, 4)) -> Path:
        """Draw with `draw(fig)` on a fresh matplotlib figure and save it as PNG under the output directory."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=figsize)
        draw(fig)
        fig.tight_layout()
        path = self.out / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        self.figures.append(path)
        return path

    def finish(self, console: Any = None) -> dict[str, Any]:
        """Write results.json and results.md; print the tables; return the JSON record."""
        record = {"study": self.name, "config": to_dict(self.config), "seed": self.seed, "git_commit": git_commit(),
                  "git_dirty": git_dirty(exclude=self.out),
                  "versions": versions(), "wall_seconds": time.perf_counter() - self._t0,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": self.results,
                  "figures": [p.name for p in self.figures], "notes": self.notes}
        (self.out / "results.json").write_text(json.dumps(record, indent=2, default=_jsonable))
        parts = [f"# {self.name}", ""]
        for title, md_ in self.tables:
            parts += [f"## {title}", "", md_, ""]
        parts += [f"![{p.stem}]({p.name})" for p in self.figures]
        parts += ["", *[f"- {n}" for n in self.notes],
                  f"\ncommit {record['git_commit']}{' (uncommitted changes)' if record['git_dirty'] else ''}, "
                  f"seed {self.seed}, {record['wall_seconds']:.0f} s"]
        (self.out / "results.md").write_text("\n".join(parts) + "\n")
        if console is not None:
            for title, md_ in self.tables:
                console.print(f"\n{title}\n{md_}", markup=False, highlight=False)
            console.print(f"\n{self.name}: {self.out / 'results.json'}, {self.out / 'results.md'}"
                          + "".join(f", {p}" for p in self.figures), markup=False)
        return record


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if dataclasses.is_dataclass(v):
        return to_dict(v)
    return str(v)
