"""prs_jax.strategies"""
