"""``python -m tokenpacker_jax.data.stats``: what a config's data looks like to the trainer
(``tokenpacker_jax/data_stats.py``)."""
