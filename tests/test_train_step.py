"""The training step on 8 simulated devices: learning, sharding, stages, accumulation,
checkpoints restored onto other meshes."""

import dataclasses

import grain
import jax
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tokenpacker_jax import checkpoint, configuration, sharding
from tokenpacker_jax import train_state as state_lib
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import example as example_lib
from tokenpacker_jax.models import mllm
from tokenpacker_jax.optim import make_optimizer, split_trainable
from tokenpacker_jax.train_step import global_batch, make_train_step

VOCAB, LENGTH, BATCH = 64, 64, 8
M = example_lib.tokens_per_tile(configuration.mllm_config(tiny.get_config()))  # visual tokens


def _optim(lr=3e-3):
    return ml_collections.ConfigDict(dict(
        lr=lr, group_lr={}, schedule="constant", warmup_ratio=0.0, weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0))


@pytest.fixture(scope="module")
def model():
    # Smaller than configs/tiny.py so that the several compiled steps stay cheap.
    config = configuration.mllm_config(tiny.get_config())
    return mllm.MultimodalLM(dataclasses.replace(
        config, multi_layers=(1, 2, 1, 2),
        vision=dataclasses.replace(config.vision, num_layers=2),
        decoder=dataclasses.replace(config.decoder, vocab_size=VOCAB, num_layers=1)))


def make_batch(seed=0):
    """Half the samples have an image after the first token, the text after it supervised."""
    return batch_lib.synthetic_batch(batch_lib.Dims(LENGTH, 1, 48), BATCH, visual_tokens=M,
                                     vocab_size=VOCAB, seed=seed, image_every=2)


def build(model, mesh, trainable, microbatches=1, lr=3e-3, tx=None, **step_options):
    rules = sharding.DEFAULT_RULES
    abstract, shardings = state_lib.param_shardings(model, mesh, rules)
    if tx is None:
        tx, _ = make_optimizer(_optim(lr), split_trainable(abstract, trainable)[0],
                               total_steps=100)
    params = state_lib.init_params(model, mesh, rules, jax.random.key(0), {}, shardings)
    memory_kind = "pinned_host" if step_options.get("offload") else None
    state = state_lib.create_state(params, tx, trainable, shardings, mesh, memory_kind)
    state_shardings = state_lib.state_shardings(state, shardings, tx, trainable, mesh,
                                                memory_kind)
    with sharding.use_mesh(mesh, rules):
        step = jax.jit(make_train_step(model, tx, trainable, microbatches, **step_options),
                       in_shardings=(state_shardings, None), out_shardings=(state_shardings, None),
                       donate_argnums=0)
    return state, step, state_shardings


def run_steps(mesh, step, state, batch, n):
    losses = []
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        for _ in range(n):
            state, metrics = step(state, global_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def stage2_run(model, mesh8):
    state, step, shardings = build(model, mesh8, ("projector", "decoder"))
    initial = jax.tree.map(np.asarray, state.params)
    state, losses = run_steps(mesh8, step, state, make_batch(), 12)
    return initial, state, losses, shardings


def test_loss_falls_and_state_is_sharded(stage2_run):
    _, state, losses, _ = stage2_run
    assert losses[-1] < 0.7 * losses[0], losses
    gate = state.params["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"]  # [L, embed, mlp]
    assert gate.sharding.spec == P(None, "fsdp", "tensor")
    assert gate.addressable_shards[0].data.shape[1:] == (gate.shape[1] // 2, gate.shape[2] // 2)
    # Adam's moments are sharded like the parameters they track.
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state)
               if getattr(leaf, "shape", ()) == gate.shape]
    assert moments and all(m.sharding.spec == gate.sharding.spec for m in moments)
    assert int(state.step) == 12


def test_stage2_never_changes_the_tower(stage2_run):
    initial, state, _, _ = stage2_run
    jax.tree.map(np.testing.assert_array_equal, initial["vision_tower"],
                 jax.tree.map(np.asarray, state.params["vision_tower"]))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)),
                                           initial["decoder"], state.params["decoder"]))
    assert all(changed)


def test_stage1_trains_only_the_projector(model, mesh8):
    state, step, _ = build(model, mesh8, ("projector",))
    initial = jax.tree.map(np.asarray, state.params)
    state, losses = run_steps(mesh8, step, state, make_batch(), 3)
    for group in ("vision_tower", "decoder"):
        jax.tree.map(np.testing.assert_array_equal, initial[group],
                     jax.tree.map(np.asarray, state.params[group]))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)),
                         initial["projector"], state.params["projector"])
    # TokenPacker's attention key bias shifts every logit of a softmax alike: no gradient,
    # so AdamW (weight decay 0 here) leaves it; everything else trains.
    key_bias = moved["clip_attn"]["k_proj"].pop("bias")
    assert all(jax.tree.leaves(moved)) and not key_bias
    # Frozen groups carry no optimizer state.
    n_opt = sum(leaf.size for leaf in jax.tree.leaves(state.opt_state))
    n_projector = sum(leaf.size for leaf in jax.tree.leaves(state.params["projector"]))
    assert n_opt < 2 * n_projector + 16


def test_gradient_accumulation_matches_one_big_batch(model, mesh8):
    batch = make_batch(1)
    results, metrics = [], []
    for microbatches in (1, 2):
        # Plain SGD, so that parameters move by exactly the (accumulated) gradient; Adam's
        # first step, g / |g|, would amplify float32 noise in near-zero gradients.
        state, step, _ = build(model, mesh8, ("projector", "decoder"), microbatches,
                               tx=optax.sgd(1.0))
        with sharding.use_mesh(mesh8, sharding.DEFAULT_RULES):
            state, step_metrics = step(state, global_batch(batch, mesh8))
        results.append(jax.tree.map(np.asarray, state.params))
        metrics.append({k: float(v) for k, v in step_metrics.items()})
    for key in ("loss", "accuracy", "supervised_tokens", "grad_norm"):
        np.testing.assert_allclose(metrics[1][key], metrics[0][key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 results[0], results[1])


def test_lean_step_options_give_the_same_update(model, mesh8):
    """The chunked loss, bfloat16 microbatch gradients (summed in float32) and the optimizer
    state in host memory against the plain step: the same loss and, up to bfloat16 rounding
    of the weights and gradients (this model computes in float32), the same update."""
    batch = make_batch(2)
    updates, metrics = [], []
    tx = optax.sgd(1.0, momentum=0.9)  # per-parameter state, and linear in the gradient
    for options in ({}, {"loss_chunk": 7, "grad_dtype": "bfloat16", "offload": True}):
        state, step, _ = build(model, mesh8, ("projector", "decoder"), 2, tx=tx, **options)
        before = jax.tree.map(np.asarray, state.params)
        with sharding.use_mesh(mesh8, sharding.DEFAULT_RULES):
            state, step_metrics = step(state, global_batch(batch, mesh8))
        updates.append(jax.tree.map(lambda a, b: np.asarray(b) - a, before, state.params))
        metrics.append({k: float(v) for k, v in step_metrics.items()})
        assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))
        kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state.opt_state)
                 if leaf.ndim}
        assert kinds == {"pinned_host" if options else "device"}
    np.testing.assert_allclose(metrics[1]["loss"], metrics[0]["loss"], rtol=1e-2)
    assert metrics[1]["supervised_tokens"] == metrics[0]["supervised_tokens"]
    plain, lean = (np.concatenate([u.ravel() for u in jax.tree.leaves(x)]) for x in updates)
    assert np.abs(plain).max() > 0
    assert np.linalg.norm(lean - plain) < 0.05 * np.linalg.norm(plain)


def test_checkpoint_restores_onto_other_meshes(stage2_run, tmp_path):
    _, state, _, shardings = stage2_run
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(iterator)
    manager = checkpoint.make_manager(tmp_path, asynchronous=False)
    assert checkpoint.save(manager, 12, state, iterator, '{"a": 1}', force=True)
    manager.wait_until_finished()
    expected = jax.tree.map(np.asarray, state)

    one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    other = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    for mesh in (one, other):
        target_shardings = jax.tree.map(
            lambda s, mesh=mesh: jax.sharding.NamedSharding(mesh, s.spec), shardings,
            is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
        fresh_iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
        restored = checkpoint.restore(
            manager, 12, checkpoint.abstract_like(state, target_shardings), fresh_iterator)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), expected,
                     restored)
        leaf = restored.params["decoder"]["embedder"]["embedding"]
        assert leaf.sharding.mesh.devices.size == mesh.devices.size
        assert next(fresh_iterator) == 1  # the data position came back too
    assert checkpoint.restore_config(tmp_path) == {"a": 1}


def test_init_kernel_scale_multiplies_fresh_kernels_only(model, mesh8):
    rules = sharding.DEFAULT_RULES
    _, shardings = state_lib.param_shardings(model, mesh8, rules)
    key = jax.random.key(3)
    plain = state_lib.init_params(model, mesh8, rules, key, {}, shardings)
    loaded = {"decoder": plain["decoder"]}
    scaled = state_lib.init_params(
        model, mesh8, rules, key, loaded, shardings,
        kernel_scale={"projector": 3.0, "decoder": 5.0,
                      "vision_tower/position_embedding": 7.0})
    checked = 0
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(plain),
                                 jax.tree_util.tree_leaves_with_path(scaled), strict=True):
        name = jax.tree_util.keystr(path)
        a, b = np.asarray(a), np.asarray(b)
        if name.startswith("['projector']") and name.endswith("['kernel']"):
            np.testing.assert_allclose(b, 3.0 * a, rtol=1e-6, err_msg=name)
            checked += 1
        elif name.startswith("['vision_tower']") and name.endswith("['position_embedding']"):
            np.testing.assert_allclose(b, 7.0 * a, rtol=1e-6, err_msg=name)
            checked += 1
        else:  # biases, norms, the tower's kernels, the loaded decoder keep their values
            np.testing.assert_array_equal(b, a, err_msg=name)
    assert checked >= 5
    with pytest.raises(ValueError, match="'vision_tower/pos'.*no parameter called 'pos'"):
        state_lib.init_params(model, mesh8, rules, key, {}, shardings,
                              kernel_scale={"vision_tower/pos": 2.0})


@pytest.mark.parametrize("scale, message", [({"llm": 2.0}, "not a parameter group"),
                                            ({"llm/kernel": 2.0}, "not a parameter group"),
                                            ({"projector": 0.0}, "must be > 0")])
def test_init_kernel_scale_is_validated(scale, message):
    config = tiny.get_config()
    config.model.init_kernel_scale = scale
    with pytest.raises(configuration.ConfigError, match="model.init_kernel_scale.*" + message):
        configuration.validate(config, num_devices=1)
