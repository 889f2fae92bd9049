"""Config files, variant strings, command-line overrides, validation and the mesh."""

import importlib
import runpy
import sys
from pathlib import Path

import pytest
from absl import flags
from jax.sharding import AxisType
from ml_collections import config_flags
from paper_facts import TOKENS_PER_SCALE

from tokenpacker_jax import configuration, sharding
from tokenpacker_jax.configs import common, tiny, tokenpacker

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv, monkeypatch):
    # config_flags reads the overrides from sys.argv, as in a real launch.
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values)
    values(sys.argv)
    return values.config


def test_variant_string_and_overrides_from_the_command_line(monkeypatch):
    config = _parse([f"--config={ROOT}/configs/tokenpacker.py:scale=3",
                     "--config.mesh.tensor=2", "--config.data.image.aspect_mode=pad"], monkeypatch)
    assert config.model.projector.scale_factor == 3
    assert config.mesh.tensor == 2 and config.data.image.aspect_mode == "pad"
    configuration.validate(config, num_devices=8)


@pytest.mark.parametrize("name", ["tiny", "tokenpacker"])
def test_config_files_are_the_package_configs(name):
    """``--config=configs/NAME.py`` runs the package's own ``get_config``."""
    file = runpy.run_path(str(ROOT / "configs" / f"{name}.py"))
    assert file["get_config"] is importlib.import_module(
        f"tokenpacker_jax.configs.{name}").get_config


def test_parse_variant_types_and_errors():
    defaults = {"llm": "vicuna7b", "scale": 2, "hd": False, "lr": 1e-3}
    assert common.parse_variant("scale=4,hd=true,lr=2e-5", defaults) == {
        "llm": "vicuna7b", "scale": 4, "hd": True, "lr": 2e-5}
    with pytest.raises(ValueError, match="unknown key 'scael'"):
        common.parse_variant("scael=4", defaults)
    with pytest.raises(ValueError, match="key=value"):
        common.parse_variant("scale", defaults)


@pytest.mark.parametrize("scale,tokens", TOKENS_PER_SCALE.items())
def test_paper_variants_validate(scale, tokens):
    config = tokenpacker.get_config(f"scale={scale}")
    configuration.validate(config, num_devices=8)
    grid = configuration.vision_config(config).grid_size
    assert (grid // config.model.projector.scale_factor) ** 2 == tokens


@pytest.mark.parametrize("field,value,message", [
    ("model.projector.scale_factor", 5, "model.projector.scale_factor: 5 does not divide"),
    ("model.features.select_layer", 30, "model.features.select_layer"),
    ("mesh.data", 3, "mesh:"),
    ("data.image.aspect_mode", "stretch", "data.image.aspect_mode"),
    ("data.image.image_size", 64, "data.image.image_size"),
    ("model.vision.hidden_act", "gelu_fancy", "model.vision: unknown activation"),
    ("model.vision.num_heads", 7, "model.vision: vision width 1024 is not divisible"),
])
def test_validation_names_the_field(field, value, message):
    config = tokenpacker.get_config()
    section = config
    *parents, leaf = field.split(".")
    for name in parents:
        section = section[name]
    section[leaf] = value
    with pytest.raises(configuration.ConfigError, match=message):
        configuration.validate(config, num_devices=8)


def test_tiny_config_validates_on_one_and_eight_devices():
    for devices in (1, 8):
        configuration.validate(tiny.get_config(), num_devices=devices)
    config = tiny.get_config()
    config.mesh.update(dict(data=1, fsdp=1, tensor=8))
    with pytest.raises(configuration.ConfigError, match="mesh.tensor: 8 does not divide"):
        configuration.validate(config, num_devices=8)


def test_mesh_shape_resolves_the_rest():
    assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {
        "data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.mesh_shape({"fsdp": -1}, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="only one axis"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.mesh_shape({"model": 2}, 8)


def test_make_mesh_uses_auto_axes(mesh8):
    assert mesh8.axis_names == ("data", "fsdp", "tensor")
    assert mesh8.axis_types == (AxisType.Auto,) * 3
    assert dict(mesh8.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
