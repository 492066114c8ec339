"""prs_jax.eval"""
