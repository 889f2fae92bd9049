"""``--config=configs/tiny.py:stage=1|2,data=DIR``: the tiny CPU model
(``tokenpacker_jax/configs/tiny.py`` defines it)."""

from tokenpacker_jax.configs.tiny import get_config

__all__ = ["get_config"]
