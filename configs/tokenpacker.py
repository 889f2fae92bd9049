"""``--config=configs/tokenpacker.py:llm=vicuna7b,scale=2,stage=2``: the paper's models
(``tokenpacker_jax/configs/tokenpacker.py`` defines them and lists the variants)."""

from tokenpacker_jax.configs.tokenpacker import get_config

__all__ = ["get_config"]
