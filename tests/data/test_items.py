"""PromptItem lives in prs_jax.data (strategies.base re-exports it); the data layer does not import the engine."""

from __future__ import annotations

import subprocess
import sys


def test_prompt_item_is_one_class():
    from prs_jax.data.items import PromptItem
    from prs_jax.strategies.base import PromptItem as Reexported

    assert Reexported is PromptItem


def test_data_layer_does_not_import_the_tree_engine():
    code = ("import sys, prs_jax.data.prompt_sets, prs_jax.data.io, prs_jax.data.lock, prs_jax.data.stamp; "
            "print(sorted(m for m in sys.modules if m.startswith(('prs_jax.tree', 'prs_jax.strategies', 'jax'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
