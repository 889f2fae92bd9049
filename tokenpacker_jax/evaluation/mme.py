"""MME: per-task accuracy and accuracy+, perception and cognition totals, as the official
``eval_tool/calculation.py`` computes them.

Questions: ``DATA/llava_mme.jsonl`` (LLaVA's question file: ``question_id`` and ``image``
name the image, e.g. ``artwork/images/14777.jpg``, two questions per image; ``text`` ends in
"Answer the question using a single word or phrase."), images under
``DATA/MME_Benchmark_release_version``; answer lines as ``model_vqa_loader`` writes them (up
to 128 new tokens).

Ground truth: the official release, one directory per task; a task with an ``images``
folder keeps its question files in ``questions_answers_YN``, the others beside the images.
Each ``IMAGE.txt`` holds "question<TAB>yes|no" lines whose questions end in "Please answer
yes or no.".

An answer line is matched to its ground truth as LLaVA's ``convert_answer_to_mme`` does:
task = the part of ``question_id`` before the first '/', file = the image's name with
``.txt``, question = ``prompt`` without LLaVA's suffix, stripped, with " Please answer yes or
no." appended when absent (with two spaces before "Please" if the ground truth has it so).
The converted lines are written per task to ``mme_results/TASK.txt`` (image, question,
truth, answer; what the official tool reads).

Scoring: the answer is lower-cased; "yes" or "no" is itself, else "yes" within its first
four characters makes it yes, else "no" there makes it no, else it is neither (and wrong).
A task's accuracy is over its questions, its accuracy+ over its images (both questions
right); its score is 100 x (accuracy + accuracy+). Perception is the sum of the scores of
existence, count, position, color, posters, celebrity, scene, landmark, artwork and OCR;
cognition of commonsense_reasoning, numerical_calculation, text_translation and
code_reasoning (tasks without answers are left out of the sums and listed).
"""

from __future__ import annotations

import collections
import os
from typing import Any

from tokenpacker_jax.evaluation import files
from tokenpacker_jax.evaluation.benchmark import SHORT_ANSWER, Benchmark, Layout, finish_with_score
from tokenpacker_jax.evaluation.question_file import reader
from tokenpacker_jax.user_error import InputError

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")
MME_SUFFIX = "Please answer yes or no."
RELEASE = "MME_Benchmark_release_version"


def read_truth(release: str) -> dict[tuple[str, str], dict[str, str]]:
    """{(task, IMAGE.txt): {question: Yes|No}} from the official release."""
    truth = collections.defaultdict(dict)
    for task in sorted(os.listdir(files.require(release, "the MME release"))):
        task_dir = os.path.join(release, task)
        if not os.path.isdir(task_dir):
            continue
        qa_dir = (os.path.join(task_dir, "questions_answers_YN")
                  if os.path.isdir(os.path.join(task_dir, "images")) else task_dir)
        for name in sorted(os.listdir(files.require(qa_dir, "MME's question files"))):
            if not name.endswith(".txt"):
                continue
            path = os.path.join(qa_dir, name)
            with open(path, encoding="utf-8") as file:
                for number, line in enumerate(file, start=1):
                    if not line.strip():
                        continue
                    fields = line.strip().split("\t")
                    if len(fields) != 2 or fields[1].lower() not in ("yes", "no"):
                        raise InputError(f"{path}:{number}: expected 'question<TAB>yes|no'")
                    truth[task, name][fields[0]] = fields[1]
    if not truth:
        raise files.LayoutError(f"{release}: no task directories with question files")
    return truth


def mme_question(prompt: str, known: Any = None) -> str:
    """The official question of a LLaVA prompt (see the module docstring): the suffix
    appended with one space, or with two where ``known`` (the image's questions) has only
    that form."""
    question = prompt.replace(SHORT_ANSWER, "").strip() if SHORT_ANSWER in prompt else prompt
    if MME_SUFFIX in question:
        return question
    question = f"{question} {MME_SUFFIX}"
    if known is None or question in known:
        return question
    return question.replace(f" {MME_SUFFIX}", f"  {MME_SUFFIX}")


def parse_yes_no(text: str) -> str:
    """'yes', 'no' or 'other', as the official tool reads an answer."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def converted_lines(answers_path: str, release: str) -> dict[str, list[dict[str, Any]]]:
    """{task: [{image, file, question, truth, prediction, where}]} in the answer file's
    order; an answer with no ground truth is an error naming its line."""
    truth = read_truth(release)
    tasks = collections.defaultdict(list)
    for where, line in files.read_answer_lines(answers_path, ("question_id", "prompt", "text")):
        image = str(line["question_id"])
        task, name = image.split("/")[0], image.split("/")[-1].split(".")[0] + ".txt"
        questions = truth.get((task, name), {})
        question = mme_question(line["prompt"], questions)
        if question not in questions:
            raise InputError(f"{where}: no question {mme_question(line['prompt'])!r} for "
                             f"{image} in {release}/{task}")
        tasks[task].append({"image": image, "file": name, "question": question,
                            "truth": questions[question],
                            "prediction": line["text"], "where": where})
    return tasks


def score_mme(answers_path: str, release: str) -> dict[str, Any]:
    """Per-task ``acc``, ``acc_plus`` and ``score``; ``perception`` and ``cognition``
    totals; ``missing_tasks``. An image needs its two answers."""
    tasks = converted_lines(answers_path, release)
    unknown = sorted(set(tasks) - set(PERCEPTION) - set(COGNITION))
    if unknown:
        raise InputError(f"{answers_path}: tasks {unknown} are not MME's")
    per_task = {}
    for task in PERCEPTION + COGNITION:
        if task not in tasks:
            continue
        by_image = collections.defaultdict(list)
        for item in tasks[task]:
            by_image[item["image"]].append(
                parse_yes_no(item["prediction"]) == item["truth"].lower())
        for image, rights in by_image.items():
            if len(rights) != 2:
                where = next(i["where"] for i in tasks[task] if i["image"] == image)
                raise InputError(f"{where}: MME asks two questions about {image}; the "
                                 f"answer file has {len(rights)}")
        rights = [right for pair in by_image.values() for right in pair]
        acc = sum(rights) / len(rights)
        acc_plus = sum(all(pair) for pair in by_image.values()) / len(by_image)
        per_task[task] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus),
                          "images": len(by_image)}
    return {"per_task": per_task,
            "perception": sum(per_task[t]["score"] for t in PERCEPTION if t in per_task),
            "cognition": sum(per_task[t]["score"] for t in COGNITION if t in per_task),
            "missing_tasks": [t for t in PERCEPTION + COGNITION if t not in per_task]}


def score_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"  {task}: score {m['score']:.2f} (acc {100 * m['acc']:.2f}, acc+ "
             f"{100 * m['acc_plus']:.2f}, {m['images']} images)"
             for task, m in result["per_task"].items()]
    if result["missing_tasks"]:
        lines.append(f"  (no answers for {', '.join(result['missing_tasks'])})")
    return lines + [f"mme perception: {result['perception']:.2f} cognition: "
                    f"{result['cognition']:.2f}"]


def _score(answers: str, annotations: str, questions: str | None = None) -> list[str]:
    return score_lines(score_mme(answers, annotations))


def _finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    release = f"{layout.data}/{RELEASE}"

    def score(answers: str) -> dict[str, Any]:
        for task, items in converted_lines(answers, release).items():
            files.write_text(layout.output(f"mme_results/{task}.txt"), "".join(
                "\t".join((i["file"], i["question"], i["truth"], i["prediction"])) + "\n"
                for i in items))
        return score_mme(answers, release)

    return finish_with_score(layout, lines, score, score_lines)


MME = Benchmark("mme", reader("llava_mme.jsonl", RELEASE, "the LLaVA MME question file"),
                _finish, max_new_tokens=128, score=_score)
