"""Models and runs assembled from configs: the model (tower and LLM architectures read from
their checkpoints when configured), its pretrained weights, its placement on a mesh, the
whole training run (``assemble``: optimizer, state shapes and shardings, jitted steps), and a
trained run for inference (``load_trained``). Model code does no I/O; this module does it.

A run's saved config is read back through ``saved_config``, which brings configs saved by
earlier versions up to the current fields with the meaning they had when the run was trained
(``upgrade_saved_config``).

    run = assemble(config, mesh, total_steps=N)
    state = ...                                   # restored, or init_params + create_state
    with run.use_mesh():                          # the mesh and the logical axis rules
        state, metrics = run.train_step(state, run.global_batch(host_batch))
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from tokenpacker_jax import checkpoint, configuration, flops, sharding
from tokenpacker_jax import train_state as state_lib
from tokenpacker_jax.convert import checkpoint_io, hf, hf_decoder, hf_vision
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import example as example_lib
from tokenpacker_jax.data import hd
from tokenpacker_jax.models import mllm
from tokenpacker_jax.optim import make_optimizer, split_trainable
from tokenpacker_jax.tokenizer import load_tokenizer
from tokenpacker_jax.train_step import global_batch, make_eval_step, make_train_step


def build_model(config: ml_collections.ConfigDict) -> mllm.MultimodalLM:
    """The MLLM; with checkpoints configured, the tower / LLM architecture comes from them."""
    vision = decoder = None
    numerics = config.model.vision
    if config.model.vision_checkpoint:
        vision = hf_vision.vision_config_from_hf(
            checkpoint_io.read_config(config.model.vision_checkpoint), dtype=numerics.dtype,
            param_dtype=numerics.param_dtype, remat_policy=numerics.remat_policy)
    if config.model.decoder_checkpoint:
        d = config.model.decoder
        decoder = hf_decoder.decoder_config_from_hf(
            checkpoint_io.read_config(config.model.decoder_checkpoint), dtype=d.dtype,
            param_dtype=d.param_dtype, remat_policy=d.remat_policy,
            attention_impl=d.get("attention_impl"), attention_chunk=d.get("attention_chunk", 0),
            gather_embedding_table=d.get("gather_embedding_table", True))
    return mllm.MultimodalLM(configuration.mllm_config(config, vision=vision,
                                                       decoder=decoder))


def load_pretrained(config, shardings) -> dict[str, Any]:
    """Parameter groups read from checkpoints, each straight into its shards."""
    loaded = {}
    if config.model.vision_checkpoint:
        _, loaded["vision_tower"] = hf.load_vision_tower(
            config.model.vision_checkpoint, param_dtype=config.model.vision.param_dtype,
            shardings=shardings["vision_tower"])
    if config.model.decoder_checkpoint:
        _, loaded["decoder"] = hf.load_decoder(
            config.model.decoder_checkpoint, param_dtype=config.model.decoder.param_dtype,
            shardings=shardings["decoder"])
    return loaded


def upgrade_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run config (JSON dict) with the fields of today's ``configs/common.py``,
    meaning what the run was trained with (a copy; ``saved`` is not changed).

    ``data.hd.global_view`` (the HD global view, ``tokenpacker_jax.data.hd``): configs saved
    before it existed hold the boolean ``data.hd.reference_global_view`` instead, False by
    default, and with False the tiling built the ``fit_image`` view. So: True ->
    ``reference_canvas``; False or absent -> ``fit_image``, except for a workdir written by
    ``convert import`` (``convert.imported_from`` set), whose weights are a reference
    checkpoint trained on ``reference_canvas`` (the import then left the boolean False).
    """
    saved = copy.deepcopy(saved)
    hd_config = saved.get("data", {}).get("hd")
    if hd_config is not None and "global_view" not in hd_config:
        reference_view = hd_config.pop("reference_global_view", False)
        imported = bool(saved.get("convert", {}).get("imported_from"))
        hd_config["global_view"] = (hd.REFERENCE_CANVAS if reference_view or imported
                                    else hd.FIT_IMAGE)
    return saved


def saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config saved with a run's checkpoint (newest by default), upgraded
    (``upgrade_saved_config``)."""
    saved = checkpoint.restore_config(checkpoint.run_directory(workdir), step)
    return ml_collections.ConfigDict(upgrade_saved_config(saved))


def check_resumable(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict,
                    workdir: str) -> None:
    """Raises ConfigError if ``config`` would continue the HD run whose saved config is
    ``saved`` with the other global view (its checkpoints learnt from one view only)."""
    if config.data.image.aspect_mode != "slice" or saved.data.image.aspect_mode != "slice":
        return
    trained, given = saved.data.hd.global_view, config.data.hd.global_view
    if trained != given:
        raise configuration.ConfigError(
            f"data.hd.global_view: {workdir} was trained with {trained!r}, the config says "
            f"{given!r}; resume with --config.data.hd.global_view={trained}")


@dataclasses.dataclass
class PlacedModel:
    """The model of a config on a mesh: its parameters' shapes and shardings, nothing
    allocated."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    model: mllm.MultimodalLM
    tiles: int  # N, tile slots per row
    abstract_params: Any  # ShapeDtypeStructs
    param_shardings: Any  # NamedShardings, the same tree

    def use_mesh(self):
        """The mesh made current, with the config's logical axis rules installed."""
        return sharding.use_mesh(self.mesh, self.config.sharding.rules)

    def plain_layout(self) -> PlacedModel:
        """The same model without LoRA adapters on the same mesh: the layout of pretrained
        checkpoints, earlier stages and merged runs, which a LoRA run starts from."""
        model = mllm.MultimodalLM(mllm.without_adapters(self.model.config))
        abstract, shardings = state_lib.param_shardings(model, self.mesh,
                                                        self.config.sharding.rules, self.tiles)
        return PlacedModel(self.config, self.mesh, model, self.tiles, abstract, shardings)


def place_model(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> PlacedModel:
    """``build_model(config)`` and its parameter shardings on ``mesh`` (default: the
    config's mesh over all devices)."""
    if mesh is None:
        mesh = sharding.make_mesh(config.mesh.to_dict())
    model = build_model(config)
    tiles = batch_lib.Dims.of_config(config).tiles
    abstract, shardings = state_lib.param_shardings(model, mesh, config.sharding.rules, tiles)
    return PlacedModel(config, mesh, model, tiles, abstract, shardings)


@dataclasses.dataclass
class Run(PlacedModel):
    """Everything a training step needs, assembled once: see ``assemble``."""

    trainable: tuple[str, ...]
    tx: optax.GradientTransformation
    schedules: Mapping[str, optax.Schedule]  # {group: learning rate}, for logging
    abstract_state: state_lib.TrainState  # ShapeDtypeStructs
    state_shardings: state_lib.TrainState
    batch_shardings: Mapping[str, NamedSharding]  # of data.batch.STEP_KEYS
    train_step: Any  # jitted (state, batch) -> (state, metrics); the state is donated
    eval_step: Any  # jitted (params, batch) -> (loss sum, correct, supervised tokens)

    def init_state(self, loaded: Mapping[str, Any], key: jax.Array) -> state_lib.TrainState:
        """A step-0 state: the ``loaded`` parameter groups as given, the others initialised
        in their shards (``model.init_kernel_scale`` applied), the optimizer state sharded
        like the parameters it tracks."""
        params = state_lib.init_params(
            self.model, self.mesh, self.config.sharding.rules, key, dict(loaded),
            self.param_shardings, self.tiles,
            kernel_scale=self.config.model.get("init_kernel_scale"))
        return state_lib.create_state(params, self.tx, self.trainable, self.param_shardings,
                                      self.mesh, optimizer_memory_kind(self.config))

    def state_targets(self) -> state_lib.TrainState:
        """ShapeDtypeStructs of the state carrying its shardings: what a checkpoint restores
        onto and what the step is lowered on."""
        return checkpoint.abstract_like(self.abstract_state, self.state_shardings)

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """What the step reads of this host's batch, as global arrays."""
        return global_batch(local, self.mesh, self.batch_shardings)

    def step_flops(self) -> float:
        """Analytic FLOPs of one step on the config's global batch (``flops.py``)."""
        return flops.train_step_flops(
            self.model.config, batch=self.config.data.batch_size,
            length=self.config.data.max_length, tiles=self.tiles,
            trainable=self.trainable).total


def optimizer_memory_kind(config: ml_collections.ConfigDict) -> str | None:
    """Where the optimizer state lives: "pinned_host" with ``optim.offload`` (host memory,
    visiting the devices for the update), else None (the devices' memory)."""
    return "pinned_host" if config.optim.get("offload") else None


def assemble(config: ml_collections.ConfigDict, mesh: Mesh | None = None, *,
             total_steps: int) -> Run:
    """The training run of ``config`` on ``mesh`` (default: the config's mesh over all
    devices): the placed model, the optimizer over the trainable groups (its schedules
    ``total_steps`` long), the state's shapes and shardings, the batch's shardings, and
    the train and eval steps jitted with them (the train step donates the state).

    Nothing is allocated; the steps are traced at their first call or ``lower`` (inside
    ``run.use_mesh()``).
    """
    placed = place_model(config, mesh)
    mesh = placed.mesh
    trainable = tuple(config.train.trainable)
    trainable_params = split_trainable(placed.abstract_params, trainable)[0]
    tx, schedules = make_optimizer(config.optim, trainable_params, total_steps)
    abstract_state = state_lib.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=placed.abstract_params,
        opt_state=jax.eval_shape(tx.init, trainable_params))
    state_shardings = state_lib.state_shardings(abstract_state, placed.param_shardings, tx,
                                                trainable, mesh, optimizer_memory_kind(config))
    dims = batch_lib.Dims.of_config(config)
    batch_shardings = {key: sharding.batch_sharding(mesh, 1 + len(dims.shape(key)))
                       for key in batch_lib.STEP_KEYS}
    replicated = sharding.replicated(mesh)
    jitted_train = jax.jit(
        make_train_step(placed.model, tx, trainable, config.train.microbatches,
                        loss_chunk=config.train.get("loss_chunk", 0),
                        grad_dtype=config.train.get("grad_dtype", ""),
                        offload=bool(config.optim.get("offload")), seed=config.seed),
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated), donate_argnums=0)
    jitted_eval = jax.jit(make_eval_step(placed.model),
                          in_shardings=(state_shardings.params, batch_shardings),
                          out_shardings=replicated)
    return Run(**vars(placed), trainable=trainable, tx=tx, schedules=schedules,
               abstract_state=abstract_state, state_shardings=state_shardings,
               batch_shardings=batch_shardings, train_step=jitted_train,
               eval_step=jitted_eval)


@dataclasses.dataclass
class TrainedModel:
    """What inference needs from a training run."""

    config: ml_collections.ConfigDict
    model: mllm.MultimodalLM
    params: dict
    tokenizer: Any
    tokens_per_tile: int
    step: int  # of the checkpoint the parameters come from


def load_trained(workdir: str, *, mesh: Mesh | None = None,
                 step: int | None = None) -> TrainedModel:
    """A run's config, model, parameters (newest checkpoint by default) and tokenizer.

    The parameters are restored onto ``mesh`` (default: a one-device mesh), whatever mesh
    the run trained on.
    """
    if step is None:
        step = checkpoint.latest_step(workdir)
    config = saved_config(workdir, step)
    if mesh is None:
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                  devices=jax.devices()[:1])
    placed = place_model(config, mesh)
    params = checkpoint.restore_params(workdir, placed.abstract_params,
                                       placed.param_shardings, step)
    tokenizer = load_tokenizer(configuration.tokenizer_source(config))
    return TrainedModel(config, placed.model, params, tokenizer,
                        example_lib.tokens_per_tile(placed.model.config), step)
