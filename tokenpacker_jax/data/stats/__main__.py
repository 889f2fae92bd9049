"""``python -m tokenpacker_jax.data.stats --config=...`` (see ``data_stats.py``)."""

from tokenpacker_jax import data_stats, user_error

if __name__ == "__main__":
    data_stats.define_flags()
    user_error.run_absl(data_stats.main, "tokenpacker_jax.data.stats")
