"""The paper's TokenPacker models (LLaVA-1.5 setting, SPEC §5).

``--config=configs/tokenpacker.py:scale=2`` (scale 2, 3, 4 -> 144, 64, 36 tokens per image).
"""

from configs import common

VARIANTS = dict(scale=2)


def get_config(arg: str | None = None):
    variant = common.parse_variant(arg, VARIANTS)
    config = common.base_config()
    config.model.vision_checkpoint = ""  # set to a local openai/clip-vit-large-patch14-336
    config.model.projector.scale_factor = variant["scale"]
    return config
