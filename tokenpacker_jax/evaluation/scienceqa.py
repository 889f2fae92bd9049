"""ScienceQA-IMG: LLaVA's ``model_vqa_science`` and ``eval_science_qa``.

Questions: ``DATA/llava_test_CQM-A.json`` (a JSON list of ``{id, image?, conversations}``;
the first turn's ``value`` holds the question, the context and the options, one per line as
"A. text"), images in ``DATA/images/test`` (``image`` is ``ID/image.png``). Ground truth:
``DATA/problems.json`` (``{id: {"choices": [...], "answer": index, ...}}``) and
``DATA/pid_splits.json`` (``{"test": [id, ...], ...}``), from the ScienceQA repository.

The message is the first turn without ``<image>``, stripped, then a newline and "Answer with
the option's letter from the given choices directly."; text-only questions are asked
without an image. An answer line's ``prompt`` has ``<image>`` and a newline in front of the
message for questions with an image, which is how the scorer tells them apart. Up to 1024
new tokens.

Scoring, over every problem of the split (a problem without an answer line counts as the
answer "FAILED"): an answer that is one of A-E is that letter; one that starts with a letter
of A-E followed by ". " is that letter; else the letter of "The answer is X" followed by any
character, when exactly one such phrase is there; else it names nothing. The answer is right
when its letter is among the problem's choices and is the right one. ``accuracy`` is over
all problems, ``img_accuracy`` (the paper's SQA-IMG) over those answered with an image.
Written: ``output.json`` (right and wrong answers with their parsing) and ``result.json``
(accuracy in percent, counts, the parsed choice index and the text per problem), as the
reference writes them.
"""

from __future__ import annotations

import os
import re
from typing import Any

from tokenpacker_jax.evaluation import files
from tokenpacker_jax.evaluation.benchmark import (
    LETTER_ANSWER,
    Benchmark,
    Layout,
    Question,
    image_file,
)
from tokenpacker_jax.user_error import InputError

OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter(text: str) -> str:
    """The letter an answer gives, or "FAILED" (see the module docstring)."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def choice_index(letter: str, choices: list[Any]) -> int:
    """The choice a letter names, -1 when it names none of them."""
    return OPTIONS.index(letter) if letter in OPTIONS[:len(choices)] else -1


def score_scienceqa(answers_path: str, base_dir: str, split: str = "test"
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(scores, output, result): ``accuracy``, ``img_accuracy``, ``n``, ``img_n``; the
    reference's ``output.json`` and ``result.json`` contents."""
    splits = files.read_json(f"{base_dir}/pid_splits.json", "ScienceQA's pid_splits.json")
    problems = files.read_json(f"{base_dir}/problems.json", "ScienceQA's problems.json")
    if not isinstance(splits, dict) or split not in splits:
        raise InputError(f"{base_dir}/pid_splits.json: no split {split!r}")
    predictions = {}
    for where, line in files.read_answer_lines(answers_path, ("question_id", "prompt", "text")):
        key = str(line["question_id"])
        if key not in problems:
            raise InputError(f"{where}: question_id {key!r} is not in {base_dir}/problems.json")
        predictions[key] = line
    output = {"correct": [], "incorrect": []}
    result = {"acc": None, "correct": None, "count": None, "results": {}, "outputs": {}}
    for pid in splits[split]:
        if pid not in problems:
            raise InputError(f"{base_dir}/pid_splits.json: {split} problem {pid!r} is not in "
                             f"problems.json")
        problem = problems[pid]
        files.check_fields(f"{base_dir}/problems.json: problem {pid!r}", problem,
                           ("choices", "answer"))
        line = predictions.get(pid, {"text": "FAILED", "prompt": "Unknown"})
        letter = parse_letter(line["text"])
        index = choice_index(letter, problem["choices"])
        output["correct" if index == problem["answer"] else "incorrect"].append({
            "question_id": pid, "parsed_ans": letter,
            "ground_truth": OPTIONS[problem["answer"]], "question": line["prompt"],
            "pred": line["text"], "is_multimodal": "<image>" in line["prompt"]})
        result["results"][pid] = index
        result["outputs"][pid] = line["text"]
    correct, total = len(output["correct"]), len(output["correct"]) + len(output["incorrect"])
    img_right = sum(x["is_multimodal"] for x in output["correct"])
    img_total = img_right + sum(x["is_multimodal"] for x in output["incorrect"])
    result.update(acc=100 * correct / total if total else 0.0, correct=correct, count=total)
    scores = {"accuracy": correct / total if total else 0.0, "n": total,
              "img_accuracy": img_right / img_total if img_total else 0.0, "img_n": img_total}
    return scores, output, result


def score_lines(scores: dict[str, Any]) -> list[str]:
    return [f"  all questions: {100 * scores['accuracy']:.2f} (n={scores['n']})",
            f"scienceqa img accuracy: {100 * scores['img_accuracy']:.2f} "
            f"(n={scores['img_n']})"]


def _score(answers: str, annotations: str, questions: str | None = None) -> list[str]:
    return score_lines(score_scienceqa(answers, annotations)[0])


def _questions(layout: Layout) -> list[Question]:
    path = f"{layout.data}/llava_{layout.split}_CQM-A.json"
    records = files.read_json(path, "the LLaVA ScienceQA question file")
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of questions")
    folder = layout.images(os.path.join("images", layout.split))
    questions = []
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        files.check_fields(where, record, ("id", "conversations"))
        turns = record["conversations"]
        if not (isinstance(turns, list) and turns and isinstance(turns[0], dict)
                and isinstance(turns[0].get("value"), str)):
            raise InputError(f"{where}: conversations[0] must be {{'from', 'value': TEXT}}")
        text = turns[0]["value"].replace("<image>", "").strip() + "\n" + LETTER_ANSWER
        image = image_file(folder, record["image"], where) if "image" in record else None
        prompt = f"<image>\n{text}" if image else text
        questions.append(Question(index, record["id"], text, image, where, {"prompt": prompt}))
    return questions


def _finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    answers = files.write_jsonl(layout.output("answers.jsonl"), lines)
    scores, output, result = score_scienceqa(answers, layout.data, layout.split)
    files.write_json(layout.output("output.json"), output, indent=2)
    files.write_json(layout.output("result.json"), result, indent=2)
    files.write_json(layout.output("scores.json"), scores, indent=2)
    return score_lines(scores)


SCIENCEQA = Benchmark("scienceqa", _questions, _finish, max_new_tokens=1024, split="test",
                      score=_score)
