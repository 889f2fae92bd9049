"""Writing the small question, image, annotation and answer files of the evaluation tests
(each creates its folder)."""

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_jsonl(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_image(path, size=(40, 30), seed=0):
    """A small random picture of ``size`` (width, height)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def answers_file(path, texts):
    """An answer file as evaluate writes it: {question_id: text}."""
    return write_jsonl(path, [{"question_id": qid, "prompt": "?", "text": text,
                               "answer_id": str(i), "model_id": "m", "metadata": {}}
                              for i, (qid, text) in enumerate(texts.items())])
