"""MMBench (dev): the upload file for the OpenCompass server and the dev score with circular
evaluation.

Questions: ``DATA/mmbench_dev_20230712.tsv`` (``--split=dev_20230712``), one row per
question with ``index``, ``question``, ``hint``, option columns ``A``-``D``, ``answer`` (dev),
``category``, ``image`` (base64) and more. MMBench's circular evaluation is in the file
itself: a question with n options appears n times, its options rotated, under the indices
``i``, ``i + 1e6``, ``i + 2e6``, ...

The message is built as the reference's ``model_vqa_mmbench --single-pred-prompt`` builds it:
the hint and a newline in front of the question when the row has one; then, per option
until the first empty one, a newline, its letter, ". " and its text; then a newline and
"Answer with the option's letter from the given choices directly." A cell is empty as pandas
reads it (an empty cell or one of pandas' missing-value words such as "NA", "None",
"null") or when it reads "nan" / "none" in any case. ``--all_rounds`` (the script's option,
not used for the paper) asks each row once per rotation of its options, the letters staying
in place. Answer lines: ``question_id`` (= index), ``round_id``, ``prompt`` (the message
without the final instruction), ``text``, ``options`` and ``option_char`` (as rotated),
``answer_id``, ``model_id``, ``metadata``; up to 1024 new tokens.

Upload (``convert_mmbench_for_submission``): the TSV's columns without ``hint``,
``category``, ``source``, ``image``, ``comment`` and ``l2-category``, with ``prediction``
inserted as the 7th column (the text of the row's last answer line), written as
``MODEL.xlsx`` (sheet ``Sheet1``).

Dev score (MMBench's rules, as VLMEvalKit applies them without a language-model judge): the
option is read from an answer by ``infer_option``, else by ``infer_text``; an answer from
which neither reads one counts as wrong. A line is right when that option is the row's
``answer`` (for a rotated round, the letter under which the right text was shown). A
question counts as right only when every row of its circular group (index modulo 1e6) and
every round is right; ``vanilla`` is the accuracy over single lines.
"""

from __future__ import annotations

import base64
import binascii
import collections
import csv
import os
import sys
from collections.abc import Mapping
from typing import Any

from tokenpacker_jax.evaluation import files
from tokenpacker_jax.evaluation.benchmark import (
    LETTER_ANSWER,
    Benchmark,
    Layout,
    Question,
    llava_answer_line,
)
from tokenpacker_jax.user_error import InputError

LETTERS = ("A", "B", "C", "D")
DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
CIRCULAR = 1_000_000
# What pandas reads as missing (its default na_values).
PANDAS_MISSING = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
    "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")


def is_empty(value: str | None) -> bool:
    """An empty cell as the reference sees it (see the module docstring)."""
    return value is None or value in PANDAS_MISSING or value.lower() in ("nan", "none")


def read_tsv(path: str) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """The header and (where, row) per row of an MMBench TSV; ``index`` must be an
    integer, once per file."""
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    rows, seen = [], {}
    with open(files.require(path, "the MMBench TSV"), encoding="utf-8", newline="") as file:
        reader = csv.reader(file, delimiter="\t")
        header = next(reader, None)
        required = ("index", "question", "hint", "A", "B", "image")
        if header is None or any(c not in header for c in required):
            raise files.LayoutError(f"{path}:1: expected MMBench's columns {list(required)} "
                                    f"(and more), got {header}")
        start = reader.line_num + 1
        for cells in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if len(cells) != len(header):
                raise InputError(f"{where}: {len(cells)} cells, the header has {len(header)}")
            row = dict(zip(header, cells, strict=True))
            try:
                row["index"] = int(row["index"])
            except ValueError as err:
                raise InputError(f"{where}: index {row['index']!r} is not an integer") from err
            if row["index"] in seen:
                raise InputError(f"{where}: index {row['index']} repeats {seen[row['index']]}")
            seen[row["index"]] = where
            rows.append((where, row))
    return header, rows


def row_options(row: Mapping[str, Any]) -> list[str]:
    options = []
    for letter in LETTERS:
        if is_empty(row.get(letter)):
            break
        options.append(row[letter])
    return options


def message(row: Mapping[str, Any], options: list[str]) -> str:
    """The question as the model reads it, without the final instruction."""
    text = row["question"] if is_empty(row["hint"]) else f"{row['hint']}\n{row['question']}"
    return text + "".join(f"\n{letter}. {option}"
                          for letter, option in zip(LETTERS, options, strict=False))


def _questions(layout: Layout) -> list[Question]:
    path = f"{layout.data}/mmbench_{layout.split}.tsv"
    _, rows = read_tsv(path)
    questions = []
    for where, row in rows:
        options = row_options(row)
        if not options:
            raise InputError(f"{where}: the question has no options")
        try:
            image = base64.b64decode(row["image"], validate=True)
        except (binascii.Error, ValueError) as err:
            raise InputError(f"{where}: image is not base64 ({err})") from err
        letters = list(LETTERS[:len(options)])
        for round_id in range(len(options) if layout.all_rounds else 1):
            prompt = message(row, options)
            questions.append(Question(
                len(questions), row["index"], f"{prompt}\n{LETTER_ANSWER}", image, where,
                {"prompt": prompt, "round_id": round_id, "options": options,
                 "option_char": letters}))
            options, letters = options[1:] + options[:1], letters[1:] + letters[:1]
    return questions


def answer_line(question: Question, text: str, model_id: str) -> dict[str, Any]:
    line = llava_answer_line(question, text, model_id)
    extra = question.extra
    return {"question_id": line["question_id"], "round_id": extra["round_id"],
            "prompt": line["prompt"], "text": text, "options": extra["options"],
            "option_char": extra["option_char"], "answer_id": line["answer_id"],
            "model_id": model_id, "metadata": {}}


def infer_option(answer: str, letters: list[str]) -> str | None:
    """The option letter an answer names: a refusal is 'Z'; else, with '.()[],:;!*#{}' read
    as spaces, exactly one of ``letters`` among its words (not when 'A', which may be the
    article, stands in an answer of more than 3 words); else 'Z' when that is a word; else
    none."""
    if any(refusal in answer for refusal in REFUSALS):
        return "Z"
    for mark in ".()[],:;!*#{}":
        answer = answer.replace(mark, " ")
    words = answer.split()
    named = [letter for letter in letters if letter in words]
    if len(named) == 1:
        return None if "A" in words and len(words) > 3 else named[0]
    if not named and "Z" in words:
        return "Z"
    return None


def infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """The letter of the only option whose text (lower case) is in the answer."""
    answer = answer.lower()
    named = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return named[0] if len(named) == 1 else None


def read_option(answer: str, choices: Mapping[str, str]) -> str | None:
    return infer_option(answer, list(choices)) or infer_text(answer, choices)


def score_mmbench(answers_path: str, tsv_path: str) -> dict[str, Any]:
    """``circular`` (questions right in every rotation; the headline), ``vanilla`` (single
    lines), ``per_category`` (circular), ``n`` (questions), ``unanswered`` (questions with
    a row or round not answered)."""
    header, rows = read_tsv(tsv_path)
    if "answer" not in header:
        raise InputError(f"{tsv_path}: no answer column (the test split is scored by the "
                         f"server only)")
    by_index = {row["index"]: (where, row) for where, row in rows}
    hits = collections.defaultdict(list)  # group -> [right or not per line]
    for where, line in files.read_answer_lines(answers_path, ("question_id", "text")):
        if line["question_id"] not in by_index:
            raise InputError(f"{where}: question_id {line['question_id']!r} is not in "
                             f"{tsv_path}")
        row_where, row = by_index[line["question_id"]]
        options = row_options(row)
        if row["answer"] not in LETTERS[:len(options)]:
            raise InputError(f"{row_where}: answer {row['answer']!r} is not an option letter")
        shift = int(line.get("round_id", 0))
        shown = options[shift:] + options[:shift]
        right = LETTERS[(LETTERS.index(row["answer"]) - shift) % len(options)]
        choices = dict(zip(LETTERS, shown, strict=False))
        hits[row["index"] % CIRCULAR].append(read_option(line["text"], choices) == right)
    groups = collections.defaultdict(list)
    for _, row in rows:
        groups[row["index"] % CIRCULAR].append(row)
    per_category = collections.defaultdict(list)
    scored = []
    for group, members in groups.items():
        if len(hits.get(group, ())) < len(members):
            continue
        value = float(all(hits[group]))
        scored.append(value)
        per_category[members[0].get("category", "")].append(value)
    lines = [hit for group in hits.values() for hit in group]
    return {"circular": files.mean(scored)["accuracy"], "n": len(scored),
            "vanilla": files.mean(lines)["accuracy"], "lines": len(lines),
            "unanswered": len(groups) - len(scored),
            "per_category": files.grouped(per_category)}


def score_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"  {name}: {100 * m['accuracy']:.2f} (n={m['n']})"
             for name, m in result["per_category"].items()]
    if result["unanswered"]:
        lines.append(f"  ({result['unanswered']} questions not answered in every row and "
                     f"round; scores are over the others)")
    lines.append(f"  vanilla (single lines): {100 * result['vanilla']:.2f} "
                 f"(n={result['lines']})")
    return lines + [f"mmbench circular accuracy: {100 * result['circular']:.2f} "
                    f"(n={result['n']})"]


def _score(answers: str, annotations: str, questions: str | None = None) -> list[str]:
    return score_lines(score_mmbench(answers, annotations))


def write_upload(path: str, tsv_path: str, lines: list[dict[str, Any]]
                 ) -> tuple[str, list[str]]:
    """Writes the server's upload file (see the module docstring); returns its path and
    the TSV's header."""
    import openpyxl  # noqa: PLC0415 (openpyxl: only the upload file needs it)

    header, rows = read_tsv(tsv_path)
    predictions = {line["question_id"]: line["text"] for line in lines}
    columns = [c for c in header if c not in DROPPED]
    columns.insert(6, "prediction")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Sheet1"
    sheet.append(columns)
    for _, row in rows:
        values = {**row, "prediction": predictions.get(row["index"])}
        sheet.append([None if isinstance(values[c], str) and values[c] in PANDAS_MISSING
                      else values[c] for c in columns])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    book.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path, header


def _finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    answers = files.write_jsonl(layout.output("answers.jsonl"), lines)
    tsv = f"{layout.data}/mmbench_{layout.split}.tsv"
    upload, header = write_upload(layout.output(f"{layout.model_id}.xlsx"), tsv, lines)
    out = [f"mmbench: upload file {upload} (OpenCompass server)"]
    if "answer" not in header:
        return out
    result = score_mmbench(answers, tsv)
    files.write_json(layout.output("scores.json"), result, indent=2)
    return out + score_lines(result)


MMBENCH = Benchmark("mmbench", _questions, _finish, max_new_tokens=1024, split="dev_20230712",
                    answer_line=answer_line, score=_score)
