"""The base config and variant parsing, for config files of your own
(``tokenpacker_jax/configs/common.py`` defines them)."""

from tokenpacker_jax.configs.common import base_config, clip_vit_l14_336, parse_variant, vicuna_7b

__all__ = ["base_config", "clip_vit_l14_336", "parse_variant", "vicuna_7b"]
