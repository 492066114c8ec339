"""Experiment scripts: one module per study (see common.py), run with `prs-jax experiment NAME CONFIG`."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Sequence

# study name -> module under prs_jax.experiments (each defines `Config` and `run(cfg, console)`)
STUDIES: tuple[str, ...] = ("reward_vs_n", "offline_rl", "preference_adaptation", "sr_dpo", "rlaif", "verbalized",
                            "scaling")


def run_experiment(name: str, config: str | Path | None, overrides: Sequence[str] = (), console: Any = None
                   ) -> dict[str, Any]:
    """Load the study's typed config from YAML (+ dotted overrides) and run it; returns the result record."""
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
    from prs_jax.experiments.common import preflight

    preflight(cfg, config)
    return module.run(cfg, console)
