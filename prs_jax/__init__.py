"""prs_jax: a JAX research codebase for aligning language models."""

from prs_jax import xla_workarounds as _xla_workarounds

_xla_workarounds.apply()

__version__ = "0.1.0"
