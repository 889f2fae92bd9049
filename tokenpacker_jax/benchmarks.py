"""VQAv2, GQA and POPE scores of an answer file, as the reference's evaluation computes them.

The answer file is jsonl as ``python -m tokenpacker_jax.evaluate`` (or the reference's
``model_vqa_loader``) writes it: one record per line with ``question_id`` and ``text``.
Annotations are local files:

- ``vqav2``: the official ``v2_mscoco_*_annotations.json`` (``{"annotations": [...]}``,
  each with ``question_id``, ``answers`` = the humans' ``[{"answer": ...}, ...]`` (10),
  optionally ``answer_type`` / ``question_type``), or a jsonl of such records. The model's
  text is first processed as LLaVA's submission script does (the EvalAI answer processor),
  then scored as the official VQA evaluation does: answers stripped of newlines and tabs;
  only when the humans disagree, humans' answers and the prediction are normalised
  (punctuation, number words to digits, articles dropped, contractions restored); the
  accuracy of a question is the mean, over the 10 subsets that leave one human out, of
  min(1, matching answers in the subset / 3).
- ``gqa``: the official ``*_questions.json`` (``{question_id: {"answer", "isBalanced",
  "types": {"structural", "semantic"}}}``) or a jsonl with ``question_id`` and ``answer``.
  The prediction is ``text.rstrip('.').lower()`` (LLaVA's ``convert_gqa_for_eval``),
  compared exactly with the gold answer over the balanced questions, as GQA's ``eval.py``
  computes accuracy; "binary" / "open" (structural type ``query``) and per-type accuracies
  beside it.
- ``pope``: a jsonl of labels (``question_id``, ``label`` yes|no, optional ``category``).
  The text is parsed as LLaVA's ``eval_pope.py`` does: its first sentence (up to the first
  '.'), commas removed, split on spaces; the words "No", "not" or "no" make it a no, anything
  else a yes. Accuracy, precision, recall, F1 (yes is the positive class) and the yes ratio,
  overall and per category. Answers are paired with labels by ``question_id`` (the reference
  pairs by position within a category).

Scores are fractions over the answered questions; annotated questions without an answer are
counted as ``unanswered`` (the official tools insist on a complete set; this lets a partial
run be scored). Bad input is an error naming the file and line (jsonl) or record (JSON).
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Sequence
from typing import Any

BENCHMARKS = ("vqav2", "gqa", "pope")

# -- the official VQA normalisation ----------------------------------------------------------

# Characters that are removed (when the text uses them as separators, or has a digit-comma-
# digit anywhere) or else replaced by a space.
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                   ">", "<", "@", "`", ",", "?", "!")
VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                    "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                    "nine": "9", "ten": "10"}
VQA_ARTICLES = ("a", "an", "the")
# Word -> contraction, the official table (its capitalised keys never match lower-cased
# words; they are kept so that the table is the official one).
VQA_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't
itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's
shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll
thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're
theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've
weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've
whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've
who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's
wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've
yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've
y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
""".split())
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern reads "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead that a
# '.' never fails, so it removes every period not followed by a digit ("2.5" keeps its).
_PERIOD = re.compile(r"\.(?!\d)")
# The official code passes re.UNICODE (32) where ``sub`` takes ``count``: at most 32
# periods go.
_PERIOD_COUNT = 32


def vqa_punctuation(text: str) -> str:
    """The official ``processPunctuation``: each mark is deleted where the text has it next
    to a space (or has a digit-comma-digit anywhere), else replaced by a space; periods not
    followed by a digit are deleted."""
    out = text
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in VQA_PUNCTUATION:
        if strip_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def vqa_digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words -> digits, articles
    dropped, contractions restored, words joined by single spaces."""
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES]
    return " ".join(words)


def _vqa_normalise(text: str) -> str:
    return vqa_digits_articles(vqa_punctuation(text))


def _strip_lines(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def evalai_answer(text: str) -> str:
    """A model's answer as LLaVA's VQAv2 submission sends it (the EvalAI answer processor):
    lower case, commas and '?' removed, "'s" split off, then the official normalisation."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return _vqa_normalise(_strip_lines(text))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """One question's VQA accuracy: the mean over leave-one-human-out subsets of
    min(1, matches / 3), normalising as the official evaluation does (only when the humans
    disagree). ``prediction`` is used as given (see ``evalai_answer``)."""
    if not human_answers:
        raise ValueError("vqa_accuracy: no human answers")
    humans = [_strip_lines(answer) for answer in human_answers]
    prediction = _strip_lines(prediction)
    if len(set(humans)) > 1:
        humans = [_vqa_normalise(answer) for answer in humans]
        prediction = _vqa_normalise(prediction)
    accuracies = []
    for left_out in range(len(humans)):
        matches = sum(answer == prediction
                      for i, answer in enumerate(humans) if i != left_out)
        accuracies.append(min(1.0, matches / 3))
    return sum(accuracies) / len(accuracies)


# -- GQA and POPE parsing ----------------------------------------------------------------------

def gqa_prediction(text: str) -> str:
    """LLaVA's ``convert_gqa_for_eval``: trailing full stops removed, lower case."""
    return text.rstrip(".").lower()


def pope_says_yes(text: str) -> bool:
    """LLaVA's ``eval_pope`` parsing: the first sentence, commas removed, split on spaces;
    "No", "not" or "no" among the words make it a no, anything else a yes."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not ({"No", "not", "no"} & set(words))


# -- files -----------------------------------------------------------------------------------

def read_jsonl(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) per non-empty line; where = ``FILE:LINE``. A line that is not a JSON
    object is an error naming it."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            records.append((where, record))
    return records


def _read_records(path: str, list_key: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) from a jsonl file, a JSON list, ``{list_key: [...]}``, or a JSON
    object keyed by question id (GQA; the key becomes ``question_id``)."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        first_line = next((line for line in text.splitlines() if line.strip()), "")
        try:
            json.loads(first_line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err})") from err
        return read_jsonl(path)  # one object per line
    if isinstance(value, list):
        return [(f"{path}: record {i}", r) for i, r in enumerate(value)]
    if isinstance(value, dict):
        if list_key and isinstance(value.get(list_key), list):
            return [(f"{path}: {list_key}[{i}]", r) for i, r in enumerate(value[list_key])]
        if "question_id" in value:  # jsonl with a single line
            return [(f"{path}:1", value)]
        if all(isinstance(r, dict) for r in value.values()):
            return [(f"{path}: question {key!r}", {"question_id": key, **r})
                    for key, r in value.items()]
    expected = f'{{"{list_key}": [...]}}, ' if list_key else ""
    raise ValueError(f"{path}: expected JSON lines, a JSON list of records, {expected}or an "
                     f"object keyed by question id")


def read_annotations(path: str, fields: Sequence[str],
                     list_key: str | None = None) -> dict[str, tuple[str, dict[str, Any]]]:
    """{str(question_id): (where, record)}; each record must have ``question_id`` and
    ``fields``, and a question id may appear once."""
    annotations: dict[str, tuple[str, dict[str, Any]]] = {}
    for where, record in _read_records(path, list_key):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in ("question_id", *fields) if k not in record]
        if missing:
            raise ValueError(f"{where}: missing fields {missing}")
        key = str(record["question_id"])
        if key in annotations:
            raise ValueError(f"{where}: question_id {record['question_id']!r} repeats "
                             f"{annotations[key][0]}")
        annotations[key] = (where, record)
    return annotations


def read_answers(path: str, annotations: dict[str, tuple[str, dict[str, Any]]],
                 annotations_path: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(answer, annotation) pairs for the answer file's records, in its order. Every answer
    needs ``question_id`` and ``text``, once each, and an annotation."""
    pairs, seen = [], {}
    for where, record in read_jsonl(path):
        missing = [k for k in ("question_id", "text") if k not in record]
        if missing:
            raise ValueError(f"{where}: missing fields {missing}")
        if not isinstance(record["text"], str):
            raise ValueError(f"{where}: text must be a string, got "
                             f"{type(record['text']).__name__}")
        key = str(record["question_id"])
        if key in seen:
            raise ValueError(f"{where}: question_id {record['question_id']!r} was already "
                             f"answered at {seen[key]}")
        seen[key] = where
        if key not in annotations:
            raise ValueError(f"{where}: question_id {record['question_id']!r} is not in "
                             f"{annotations_path}")
        pairs.append((record, annotations[key][1]))
    return pairs


def _mean(values: Sequence[float]) -> dict[str, Any]:
    return {"accuracy": sum(values) / len(values) if values else 0.0, "n": len(values)}


def _grouped(groups: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {name: _mean(values) for name, values in sorted(groups.items())}


# -- scores ----------------------------------------------------------------------------------

def score_vqav2(answers_path: str, annotations_path: str) -> dict[str, Any]:
    """VQAv2 accuracy of an answer file (see the module docstring).

    Returns ``accuracy`` and ``n`` (answered questions), ``unanswered``, and
    ``per_answer_type`` / ``per_question_type`` ({type: {accuracy, n}}).
    """
    annotations = read_annotations(annotations_path, ("answers",), list_key="annotations")
    for where, record in annotations.values():
        humans = record["answers"]
        if not isinstance(humans, list) or not humans or not all(
                isinstance(h, dict) and isinstance(h.get("answer"), str) for h in humans):
            raise ValueError(f"{where}: answers must be a non-empty list of "
                             f'{{"answer": TEXT}}')
    pairs = read_answers(answers_path, annotations, annotations_path)
    scores, per_answer, per_question = [], collections.defaultdict(list), \
        collections.defaultdict(list)
    for answer, annotation in pairs:
        value = vqa_accuracy(evalai_answer(answer["text"]),
                             [h["answer"] for h in annotation["answers"]])
        scores.append(value)
        if "answer_type" in annotation:
            per_answer[annotation["answer_type"]].append(value)
        if "question_type" in annotation:
            per_question[annotation["question_type"]].append(value)
    return {**_mean(scores), "unanswered": len(annotations) - len(pairs),
            "per_answer_type": _grouped(per_answer),
            "per_question_type": _grouped(per_question)}


def score_gqa(answers_path: str, annotations_path: str) -> dict[str, Any]:
    """GQA accuracy of an answer file over the balanced questions (all questions when the
    annotations do not say ``isBalanced``).

    Returns ``accuracy``, ``n``, ``unanswered`` (balanced questions without an answer),
    ``per_answer_type`` ({binary, open}), ``per_structural_type``, ``per_semantic_type``.
    """
    annotations = read_annotations(annotations_path, ("answer",))
    for where, record in annotations.values():
        if not isinstance(record["answer"], str):
            raise ValueError(f"{where}: answer must be a string")
    balanced = {key for key, (_, r) in annotations.items() if r.get("isBalanced", True)}
    pairs = read_answers(answers_path, annotations, annotations_path)
    scores, kinds = [], collections.defaultdict(list)
    structural, semantic = collections.defaultdict(list), collections.defaultdict(list)
    answered = set()
    for answer, annotation in pairs:
        key = str(annotation["question_id"])
        if key not in balanced:
            continue
        answered.add(key)
        value = float(gqa_prediction(answer["text"]) == annotation["answer"])
        scores.append(value)
        types = annotation.get("types") or {}
        if "structural" in types:
            kinds["open" if types["structural"] == "query" else "binary"].append(value)
            structural[types["structural"]].append(value)
        if "semantic" in types:
            semantic[types["semantic"]].append(value)
    return {**_mean(scores), "unanswered": len(balanced - answered),
            "per_answer_type": _grouped(kinds), "per_structural_type": _grouped(structural),
            "per_semantic_type": _grouped(semantic)}


def pope_metrics(predictions: Sequence[bool], labels: Sequence[bool]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (yes = positive), yes ratio and the confusion counts
    of yes/no ``predictions`` against ``labels``. A ratio with a zero denominator is 0."""
    tp = sum(p and t for p, t in zip(predictions, labels))
    fp = sum(p and not t for p, t in zip(predictions, labels))
    tn = sum(not p and not t for p, t in zip(predictions, labels))
    fn = sum(not p and t for p, t in zip(predictions, labels))
    n = len(predictions)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0, "n": n,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score_pope(answers_path: str, annotations_path: str) -> dict[str, Any]:
    """POPE scores of an answer file (see ``pope_metrics``), overall and ``per_category``,
    with ``unanswered``."""
    annotations = read_annotations(annotations_path, ("label",))
    for where, record in annotations.values():
        if record["label"] not in ("yes", "no"):
            raise ValueError(f"{where}: label must be 'yes' or 'no', got {record['label']!r}")
    pairs = read_answers(answers_path, annotations, annotations_path)
    by_category = collections.defaultdict(lambda: ([], []))
    predictions, labels = [], []
    for answer, annotation in pairs:
        said_yes, is_yes = pope_says_yes(answer["text"]), annotation["label"] == "yes"
        predictions.append(said_yes)
        labels.append(is_yes)
        if "category" in annotation:
            by_category[annotation["category"]][0].append(said_yes)
            by_category[annotation["category"]][1].append(is_yes)
    return {**pope_metrics(predictions, labels), "unanswered": len(annotations) - len(pairs),
            "per_category": {name: pope_metrics(*values)
                             for name, values in sorted(by_category.items())}}


SCORERS = {"vqav2": score_vqav2, "gqa": score_gqa, "pope": score_pope}


def score_benchmark(benchmark: str, answers_path: str, annotations_path: str
                    ) -> dict[str, Any]:
    """``score_vqav2`` / ``score_gqa`` / ``score_pope`` by name."""
    if benchmark not in SCORERS:
        raise ValueError(f"--benchmark must be one of {list(SCORERS)}, got {benchmark!r}")
    return SCORERS[benchmark](answers_path, annotations_path)


def format_scores(benchmark: str, result: dict[str, Any]) -> list[str]:
    """Printable lines, in percent as the benchmarks report them; the last line is the
    headline: ``{benchmark} accuracy: X (n=N)`` (POPE adds F1, precision, recall, yes)."""
    def pope_line(prefix: str, m: dict[str, Any]) -> str:
        return (f"{prefix}accuracy: {100 * m['accuracy']:.2f} f1: {100 * m['f1']:.2f} "
                f"precision: {100 * m['precision']:.2f} recall: {100 * m['recall']:.2f} "
                f"yes: {100 * m['yes_ratio']:.2f} (n={m['n']})")

    lines = []
    for key, groups in result.items():
        if not key.startswith("per_"):
            continue
        for name, m in groups.items():
            label = f"{key.removeprefix('per_')} {name}"
            lines.append("  " + (pope_line(f"{label}: ", m) if benchmark == "pope"
                                 else f"{label}: {100 * m['accuracy']:.2f} (n={m['n']})"))
    if result["unanswered"]:
        lines.append(f"  ({result['unanswered']} annotated questions have no answer; scores "
                     f"are over the answered ones)")
    if benchmark == "pope":
        lines.append(pope_line("pope ", result))
    else:
        lines.append(f"{benchmark} accuracy: {100 * result['accuracy']:.2f} (n={result['n']})")
    return lines
