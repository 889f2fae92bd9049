"""The main job at toy scale on the CPU (README's first command).

    python -m tokenpacker_jax.quickstart [--config=configs/tiny.py] [--image=FILE]

Today it runs what exists end to end on one image: load and preprocess it, run the vision
tower, select the single- and multi-level features, and pack them with the configured
projector, printing the shapes and what the first packed token looked at. (Training and
question answering join here as they land.)
"""

from __future__ import annotations

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image, ImageDraw

from tokenpacker_jax import configuration

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_IMAGE = flags.DEFINE_string("image", None, "Image file; default: a generated one.")


def demo_image(size: int = 96) -> Image.Image:
    """A grey canvas with a small red square in the top-left quadrant."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((size // 8, size // 8, size // 4, size // 4),
                                    fill=(220, 30, 30))
    return image


def main(argv):
    del argv
    import jax  # noqa: PLC0415 (after flags, so --help is fast)
    import jax.numpy as jnp  # noqa: PLC0415

    from tokenpacker_jax.data import image as image_lib  # noqa: PLC0415
    from tokenpacker_jax.models import projectors, vision  # noqa: PLC0415

    config = _CONFIG.value
    configuration.validate(config)
    settings = config.data.image
    image = image_lib.load_image(_IMAGE.value) if _IMAGE.value else demo_image()
    pixels = image_lib.preprocess(image, mode=settings.aspect_mode,
                                  image_size=settings.image_size, mean=settings.mean,
                                  std=settings.std)[None]
    print(f"image {image.size[0]}x{image.size[1]} {image.mode} -> pixels {pixels.shape}")

    tower = vision.VisionTransformer(configuration.vision_config(config))
    projector_config = projectors.ProjectorConfig(
        **config.model.projector.to_dict(), out_dim=config.model.vision.width)
    projector = projectors.build_projector(projector_config)
    features = config.model.features
    key_tower, key_projector = jax.random.split(jax.random.key(config.seed))
    tower_params = tower.init(key_tower, pixels)["params"]

    @jax.jit
    def encode(tower_params, pixels):
        hidden = tower.apply({"params": tower_params}, pixels)
        return vision.select_features(hidden, has_class_token=tower.config.has_class_token,
                                      select_layer=features.select_layer,
                                      multi_layers=features.multi_layers)

    x_last, x_multi = encode(tower_params, jnp.asarray(pixels))
    print(f"vision tower: {tower.config.family}, {tower.config.num_layers} layers -> "
          f"x {x_last.shape}, x_multi {x_multi.shape}")
    projector_params = projector.init(key_projector, x_last, x_multi)["params"]
    tokens, attention = projector.apply({"params": projector_params}, x_last, x_multi,
                                        return_attention=True)
    print(f"projector {projector_config.name} (scale {projector_config.scale_factor}): "
          f"{x_last.shape[1]} patches -> {tokens.shape[1]} tokens of width {tokens.shape[2]}")
    weights = np.asarray(attention[0, 0]).mean(axis=0)
    print("token 0 attended to its region's patches with weights "
          + " ".join(f"{w:.3f}" for w in weights))


if __name__ == "__main__":
    app.run(main)
