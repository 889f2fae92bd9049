"""Run configs read back from checkpoints: configs saved by earlier versions keep the meaning
they were trained with; an HD run resumes only with the global view it trained on."""

import ml_collections
import pytest

from tokenpacker_jax import assembly, configuration
from tokenpacker_jax.configs import common


def saved(**hd_fields):
    """The saved JSON of a base config, its HD section holding just ``hd_fields`` beside
    the patch number and separator ids."""
    config = common.base_config().to_dict()
    config["data"]["hd"] = {"patch_num": 9, "comma_id": 29892, "newline_id": 0, **hd_fields}
    return config


@pytest.mark.parametrize("hd_fields, imported, view", [
    ({"global_view": "fit_image"}, True, "fit_image"),  # today's configs: as saved
    ({"global_view": "reference_canvas"}, False, "reference_canvas"),
    # Before the named field: the boolean, False by default, which tiled with fit_image ...
    ({"reference_global_view": True}, False, "reference_canvas"),
    ({"reference_global_view": False}, False, "fit_image"),
    ({}, False, "fit_image"),
    # ... except in a workdir of `convert import`: a reference checkpoint's weights.
    ({"reference_global_view": False}, True, "reference_canvas"),
    ({}, True, "reference_canvas"),
])
def test_saved_config_keeps_the_view_it_was_trained_with(hd_fields, imported, view):
    config = saved(**hd_fields)
    if imported:
        config["convert"] = {"imported_from": "/models/llava-tokenpacker-hd-7b"}
    before = repr(config)
    upgraded = assembly.upgrade_saved_config(config)
    assert repr(config) == before  # the input is left alone
    assert upgraded["data"]["hd"]["global_view"] == view
    assert "reference_global_view" not in upgraded["data"]["hd"]
    configuration.validate(ml_collections.ConfigDict(upgraded))


def hd_config(view, mode="slice"):
    config = common.base_config()
    config.data.image.aspect_mode = mode
    config.data.hd.global_view = view
    return config


def test_resuming_with_the_other_view_is_an_error():
    trained = hd_config("fit_image")
    with pytest.raises(configuration.ConfigError,
                       match="data.hd.global_view: runs/hd was trained with 'fit_image'.*"
                             "--config.data.hd.global_view=fit_image"):
        assembly.check_resumable(hd_config("reference_canvas"), trained, "runs/hd")
    assembly.check_resumable(hd_config("fit_image"), trained, "runs/hd")
    # Without HD tiling there is no global view to disagree about.
    assembly.check_resumable(hd_config("reference_canvas", "pad"),
                            hd_config("fit_image", "pad"), "runs/pad")


def test_validate_names_the_global_view_field():
    with pytest.raises(configuration.ConfigError, match="data.hd.global_view.*'canvas'"):
        configuration.validate(hd_config("canvas"))
