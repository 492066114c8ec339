"""Experiment scripts: one module per study (see common.py), run with `prs-jax experiment NAME CONFIG`."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Sequence

# study name -> module under prs_jax.experiments. Each defines `Config`, `measure_study(cfg, console)` (raw
# per-unit records), `report_study(cfg, console)` (tables, plots, verdicts from the saved records alone:
# `--report`) and `run(cfg, console)` (both)
STUDIES: tuple[str, ...] = ("reward_vs_n", "offline_rl", "preference_adaptation", "sr_dpo", "rlaif", "verbalized",
                            "scaling")


def run_experiment(name: str, config: str | Path | None, overrides: Sequence[str] = (), console: Any = None,
                   report_only: bool = False) -> dict[str, Any]:
    """Load the study's typed config from YAML (+ dotted overrides) and run it; returns the result record.
    `report_only`: remake the tables, plots and results from the study's saved records without measuring."""
    from prs_jax.config import load_config

    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; known: {', '.join(STUDIES)}")
    try:
        module = importlib.import_module(f"prs_jax.experiments.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"prs_jax.experiments.{name}":
            raise ValueError(f"study {name!r} is listed but not implemented yet (prs_jax/experiments/{name}.py).")
        raise
    cfg = load_config(module.Config, config, overrides)
    if report_only:
        return module.report_study(cfg, console)  # no checkpoints needed: no preflight
    from prs_jax.experiments.common import preflight

    preflight(cfg, config)
    return module.run(cfg, console)
