"""A tiny model for the CPU: the whole pipeline at toy scale in minutes.

``--config=configs/tiny.py`` (no variants yet).
"""

from configs import common


def get_config(arg: str | None = None):
    common.parse_variant(arg, {})
    config = common.base_config()
    config.model.vision.update(dict(
        image_size=48, patch_size=4, width=64, mlp_dim=128, num_layers=4, num_heads=4))
    config.model.features.select_layer = -2
    config.model.features.multi_layers = (1, 2, 3, 4)
    config.model.projector.update(dict(scale_factor=2, embed_dim=64, num_heads=4))
    config.model.decoder.update(dict(
        vocab_size=512, width=128, mlp_dim=256, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=32, max_position_embeddings=512))
    config.data.image.image_size = 48
    config.data.update(dict(max_length=256, batch_size=16, read_threads=2, prefetch_buffer=32))
    config.data.hd.update(dict(comma_id=-1, newline_id=-1))
    return config
