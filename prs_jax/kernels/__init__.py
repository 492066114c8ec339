"""Pallas kernels, each beside its pure-JAX reference (installed as `prs_jax.kernels`).

Kernels depend on nothing else in prs_jax. Every kernel is the default path only where it is verified;
the pure-JAX reference is the default on CPU.
"""
