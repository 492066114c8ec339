"""prs_jax.feedback"""
