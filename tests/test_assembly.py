"""The run assembly (``assembly.py``): one place builds the model's placement, the optimizer
and the jitted steps; what it returns is consistent with the batch contract."""

import ast
from pathlib import Path

import jax

from tokenpacker_jax import assembly
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.data import batch as batch_lib

PACKAGE = Path(__file__).resolve().parents[1] / "tokenpacker_jax"
# Calls that assemble a run; only assembly.py makes them.
ASSEMBLING = {"param_shardings", "make_optimizer", "make_train_step", "make_eval_step"}
# Donation elsewhere than in a run: the serving engine's programs donate its KV cache.
DONATES_A_KV_CACHE = {"serving/engine.py"}


def _calls(tree, donation_allowed=False):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ASSEMBLING:
                yield node.lineno, name
        elif (isinstance(node, ast.keyword) and node.arg == "donate_argnums"
              and not donation_allowed):
            yield node.value.lineno, "donate_argnums"


def test_only_the_assembly_assembles_a_run():
    found = [f"{path.relative_to(PACKAGE)}:{line}: {name}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name != "assembly.py"
             for line, name in _calls(ast.parse(path.read_text()),
                                      str(path.relative_to(PACKAGE)) in DONATES_A_KV_CACHE)]
    assert not found, found


def test_assembled_run_is_consistent(mesh8):
    config = tiny.get_config("stage=2")
    run = assembly.assemble(config, mesh8, total_steps=10)
    assert run.mesh is mesh8 and run.trainable == ("vision_tower", "projector", "decoder")
    assert set(run.batch_shardings) == set(batch_lib.STEP_KEYS)
    assert jax.tree.structure(run.state_shardings.params) == jax.tree.structure(
        run.param_shardings)
    targets = run.state_targets()
    assert jax.tree.leaves(targets)[0].sharding is not None
    assert run.step_flops() > 0
    # The step lowers on the contract's abstract batch, its outputs aliasing the donated state.
    batch = batch_lib.abstract_batch(batch_lib.Dims.of_config(config),
                                     config.data.batch_size, mesh8)
    with run.use_mesh():
        text = run.train_step.lower(targets, batch).as_text()
    assert text.count("tf.aliasing_output") == len(jax.tree.leaves(targets))
