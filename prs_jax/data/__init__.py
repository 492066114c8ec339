"""prs_jax.data"""
