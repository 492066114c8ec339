"""prs_jax.train"""
