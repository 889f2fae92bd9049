"""What the serving tests share: a small random run (``serving.random_run`` with 2 tower
layers and 1 decoder layer) and the reference's prompt for a vicuna_v1 conversation."""

from pathlib import Path

import numpy as np

from tokenpacker_jax.serving.random_run import write_random_run

QUESTIONS = ("What digit is shown?", "Where is the red circle? Answer briefly.",
             "How many shapes are there?", "Describe this picture")


def write_tiny_run(root: Path) -> tuple[Path, Path]:
    """(run directory, data directory with images/test/0000{0..3}.png)."""
    run, data = write_random_run(str(root), vision_layers=2, decoder_layers=1)
    return Path(run), Path(data)


def reference_vicuna_prompt(questions, answers, system=""):
    """The reference's vicuna_v1 prompt string (SeparatorStyle.TWO: the system, then
    "USER: q ASSISTANT: a</s>" per round, the image placeholder first in the first
    question) ending where the next answer begins."""
    rounds = [f"USER: {q} ASSISTANT: {a}</s>" for q, a in zip(questions, answers, strict=False)]
    return system + " " + "".join(rounds) + f"USER: {questions[len(answers)]} ASSISTANT:"


def reference_prompt_ids(hf_tokenizer, text, image_span):
    """The reference's ``tokenizer_image_token``: each chunk around ``<image>`` tokenised
    on its own with BOS, the later chunks' BOS dropped, the image's ids in between.
    Returns (ids, visual mask)."""
    chunks = [hf_tokenizer(chunk).input_ids for chunk in text.split("<image>")]
    ids, visual = list(chunks[0]), [False] * len(chunks[0])
    for chunk in chunks[1:]:
        ids += list(image_span) + chunk[1:]
        visual += [True] * len(image_span) + [False] * (len(chunk) - 1)
    return np.asarray(ids, np.int32), np.asarray(visual)
