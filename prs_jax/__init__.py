"""prs_jax: a JAX research codebase for aligning language models."""

__version__ = "0.1.0"
