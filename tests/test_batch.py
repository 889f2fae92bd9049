"""The batch contract (``data/batch.py``): its keys are the model's arguments, its generated
and abstract batches follow it, and no other module spells the keys out again."""

import ast
import inspect
from pathlib import Path

import numpy as np

from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.models.mllm import MultimodalLM

PACKAGE = Path(__file__).resolve().parents[1] / "tokenpacker_jax"
DIMS = batch_lib.Dims(length=24, tiles=2, image_size=16)


def test_model_inputs_are_the_models_arguments():
    arguments = list(inspect.signature(MultimodalLM.__call__).parameters)[1:]
    assert tuple(arguments) == batch_lib.MODEL_INPUTS
    prefill = [name for name, parameter in inspect.signature(MultimodalLM.prefill).parameters
               .items() if parameter.kind == parameter.POSITIONAL_OR_KEYWORD][1:]
    assert tuple(prefill) == batch_lib.PREFILL_INPUTS
    assert set(batch_lib.STEP_KEYS) <= set(batch_lib.KEYS)


def test_padding_row_and_abstract_batch_shapes():
    row = batch_lib.padding_row(DIMS, pad_id=7)
    assert {k: (v.shape, v.dtype) for k, v in row.items()} == {
        "input_ids": ((24,), np.int32), "target_ids": ((24,), np.int32),
        "loss_mask": ((24,), np.float32), "attention_mask": ((24,), np.int32),
        "image_mask": ((24,), np.bool_), "segment_ids": ((24,), np.int32),
        "positions": ((24,), np.int32), "pixel_values": ((2, 16, 16, 3), np.float32),
        "tile_mask": ((2,), np.bool_), "sample_id": ((), np.int64)}
    assert (row["input_ids"] == 7).all() and (row["target_ids"] == 7).all()
    assert int(row["sample_id"]) == -1 and not row["attention_mask"].any()
    abstract = batch_lib.abstract_batch(DIMS, 4, keys=batch_lib.KEYS)
    assert {k: (s.shape, s.dtype) for k, s in abstract.items()} == {
        k: ((4, *v.shape), v.dtype) for k, v in row.items()}


def test_synthetic_batch_follows_the_contract():
    generated = batch_lib.synthetic_batch(DIMS, 4, visual_tokens=5, vocab_size=50, seed=1,
                                          image_every=2, bos_id=1, pad_id=0)
    abstract = batch_lib.abstract_batch(DIMS, 4, keys=batch_lib.KEYS)
    assert {k: (v.shape, v.dtype) for k, v in generated.items()} == {
        k: (s.shape, s.dtype) for k, s in abstract.items()}
    assert (generated["input_ids"][:, 0] == 1).all()
    np.testing.assert_array_equal(generated["image_mask"].sum(axis=1), [5, 0, 5, 0])
    np.testing.assert_array_equal(generated["tile_mask"], [[1, 0], [0, 0], [1, 0], [0, 0]])
    assert (generated["input_ids"][generated["image_mask"]] == 0).all()
    np.testing.assert_array_equal(generated["target_ids"][:, :-1],
                                  generated["input_ids"][:, 1:])
    np.testing.assert_array_equal(generated["loss_mask"][0],
                                  [0.0] * 6 + [1.0] * 17 + [0.0])
    assert generated["attention_mask"].all()


def _key_collections(tree):
    """Line numbers of string collections and dicts whose names are three or more of the
    contract's keys and nothing else."""
    keys = set(batch_lib.KEYS)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            names = {e.value for e in node.elts if isinstance(e, ast.Constant)}
        elif isinstance(node, ast.Dict):
            names = {k.value for k in node.keys if isinstance(k, ast.Constant)}
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
            names = {k.arg for k in node.keywords}
        else:
            continue
        if len(names) >= 3 and names <= keys:
            yield node.lineno


def test_no_other_module_spells_out_the_batch_keys():
    """The keys are listed once; other modules take them from the contract."""
    found = [f"{path.relative_to(PACKAGE)}:{line}"
             for path in sorted(PACKAGE.rglob("*.py")) if path != PACKAGE / "data" / "batch.py"
             for line in _key_collections(ast.parse(path.read_text()))]
    assert not found, found
