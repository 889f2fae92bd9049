"""VQAv2, VizWiz and TextVQA: short answers processed as EvalAI does.

Questions (LLaVA question files, see ``question_file``): the message is ``text`` as
published, which already ends in the reference's suffix ("Answer the question using a single
word or phrase.", and for VizWiz before it "When the provided information is insufficient,
respond with 'Unanswerable'."; for TextVQA the OCR-token variant, "Reference OCR token: ..."
on its own line between the question and the suffix). The answer lines are
``model_vqa_loader``'s (up to 128 new tokens).

- ``vqav2`` (``--split=test-dev2015``): ``DATA/llava_vqav2_mscoco_test-dev2015.jsonl``,
  images in ``DATA/test2015``. Writes the submission for the EvalAI server as LLaVA's
  ``convert_vqav2_for_submission`` does: one ``{question_id, answer}`` per question of
  ``DATA/llava_vqav2_mscoco_test2015.jsonl`` (the whole test set, which the server wants
  even for test-dev), the answer EvalAI-processed (``evalai_answer``), "" for a question not
  answered. ``score`` scores an answer file against the official annotations (val):
  answers stripped of newlines and tabs; only when the humans disagree, humans' answers and
  the prediction are normalised (punctuation, number words to digits, articles dropped,
  contractions restored); a question's accuracy is the mean, over the 10 subsets that leave
  one human out, of min(1, matching answers in the subset / 3).
- ``vizwiz`` (``--split=test``): ``DATA/llava_test.jsonl``, images in ``DATA/test``. Writes
  the submission as ``convert_vizwiz_for_submission`` does: ``{image, answer}`` per question
  in the question file's order, the answer EvalAI-processed.
- ``textvqa`` (val): ``DATA/llava_textvqa_val_v051_ocr.jsonl``, images in
  ``DATA/train_images``, scored against ``DATA/TextVQA_0.5.1_val.json`` as LLaVA's
  ``eval_textvqa`` with the m4c evaluator does: an answer line is matched to its annotation
  by (``question_id`` = the image id, the question recovered from ``prompt``, lower case);
  the prediction and each of the 10 human answers are EvalAI-processed, and the score is the
  leave-one-human-out accuracy above (0 when no human gave the prediction).

The question is recovered from ``prompt`` as ``eval_textvqa`` does: after "OCR tokens: ",
the text between "Question: " and " Short answer:"; with "Reference OCR token: " in a
three-line prompt, the line that is not the OCR line among the first two; in a two-line
prompt the first line. Any other prompt is an error naming the answer line.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import Any

from tokenpacker_jax.evaluation import files
from tokenpacker_jax.evaluation.benchmark import Benchmark, Layout, finish_with_score
from tokenpacker_jax.evaluation.question_file import reader
from tokenpacker_jax.user_error import InputError

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


def _leave_one_out(prediction: str, humans: Sequence[str]) -> float:
    """The mean over the subsets that leave one human out of min(1, matches / 3)."""
    accuracies = []
    for left_out in range(len(humans)):
        matches = sum(answer == prediction
                      for i, answer in enumerate(humans) if i != left_out)
        accuracies.append(min(1.0, matches / 3))
    return sum(accuracies) / len(accuracies)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """One question's VQA accuracy: ``_leave_one_out``, normalising as the official
    evaluation does (only when the humans disagree). ``prediction`` is used as given (see
    ``evalai_answer``)."""
    if not human_answers:
        raise InputError("vqa_accuracy: no human answers")
    humans = [_strip_lines(answer) for answer in human_answers]
    prediction = _strip_lines(prediction)
    if len(set(humans)) > 1:
        humans = [_vqa_normalise(answer) for answer in humans]
        prediction = _vqa_normalise(prediction)
    return _leave_one_out(prediction, humans)


def textvqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """One TextVQA question's accuracy as the m4c evaluator computes it: the prediction
    and the 10 humans' answers EvalAI-processed, then ``_leave_one_out``."""
    if len(human_answers) != 10:
        raise InputError(f"TextVQA questions have 10 human answers, got {len(human_answers)}")
    return _leave_one_out(evalai_answer(prediction), [evalai_answer(a) for a in human_answers])


def score_vqav2(answers_path: str, annotations_path: str) -> dict[str, Any]:
    """VQAv2 accuracy of an answer file (see the module docstring).

    Returns ``accuracy`` and ``n`` (answered questions), ``unanswered``, and
    ``per_answer_type`` / ``per_question_type`` ({type: {accuracy, n}}).
    """
    annotations = files.read_annotations(annotations_path, ("answers",),
                                         list_key="annotations")
    for where, record in annotations.values():
        humans = record["answers"]
        if not isinstance(humans, list) or not humans or not all(
                isinstance(h, dict) and isinstance(h.get("answer"), str) for h in humans):
            raise InputError(f"{where}: answers must be a non-empty list of "
                             f'{{"answer": TEXT}}')
    pairs = files.read_answers(answers_path, annotations, annotations_path)
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
    return {**files.mean(scores), "unanswered": len(annotations) - len(pairs),
            "per_answer_type": files.grouped(per_answer),
            "per_question_type": files.grouped(per_question)}


def accuracy_lines(name: str, result: dict[str, Any]) -> list[str]:
    """Printable lines of an accuracy result with ``per_*`` groups, in percent; the last
    is the headline ``{name} accuracy: X (n=N)``."""
    lines = []
    for key, groups in result.items():
        if key.startswith("per_"):
            lines += [f"  {key.removeprefix('per_')} {group}: {100 * m['accuracy']:.2f} "
                      f"(n={m['n']})" for group, m in groups.items()]
    if result.get("unanswered"):
        lines.append(f"  ({result['unanswered']} annotated questions have no answer; scores "
                     f"are over the answered ones)")
    return lines + [f"{name} accuracy: {100 * result['accuracy']:.2f} (n={result['n']})"]


def accuracy_score(name: str, scorer):
    """``Benchmark.score`` printing ``scorer(answers, annotations)`` with
    ``accuracy_lines``."""
    def score(answers: str, annotations: str, questions: str | None = None) -> list[str]:
        return accuracy_lines(name, scorer(answers, annotations))

    return score


# -- runs -------------------------------------------------------------------------------------

def _submission(lines: Sequence[dict[str, Any]]) -> dict[Any, str]:
    """{question_id: EvalAI-processed answer} (a later line for a question wins)."""
    return {line["question_id"]: evalai_answer(line["text"]) for line in lines}


def _vqav2_finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    test = files.require(f"{layout.data}/llava_vqav2_mscoco_test2015.jsonl",
                         "the whole test2015 question file, which the submission lists")
    answers = _submission(lines)
    upload = [{"question_id": record["question_id"],
               "answer": answers.get(record["question_id"], "")}
              for _, record in files.read_jsonl(test)]
    files.write_jsonl(layout.output("answers.jsonl"), lines)
    path = files.write_json(layout.output("submission.json"), upload)
    return [f"vqav2: {len(lines)} answers, {len(upload)} questions in the submission {path} "
            f"(EvalAI: test-dev phase)"]


def _vizwiz_finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    questions = files.read_jsonl(f"{layout.data}/llava_{layout.split}.jsonl")
    answers = _submission(lines)
    upload = []
    for where, record in questions:
        if record["question_id"] not in answers:
            raise InputError(f"{where}: question {record['question_id']!r} has no answer")
        upload.append({"image": record["image"], "answer": answers[record["question_id"]]})
    files.write_jsonl(layout.output("answers.jsonl"), lines)
    path = files.write_json(layout.output("submission.json"), upload)
    return [f"vizwiz: {len(upload)} answers in the submission {path} (EvalAI)"]


_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def textvqa_question(prompt: str, where: str) -> str:
    """The question inside a TextVQA prompt, lower case (see the module docstring)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_QUESTION.search(prompt)
        if match is None:
            raise InputError(f"{where}: prompt starts with 'OCR tokens: ' but has no "
                             f"'Question: ... Short answer:'")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise InputError(f"{where}: cannot find the question in prompt {prompt!r} (expected "
                         f"a question line, an optional OCR-token line and the suffix)")
    return question.lower()


def score_textvqa(answers_path: str, annotations_path: str) -> dict[str, Any]:
    """TextVQA accuracy of an answer file (see the module docstring): ``accuracy``, ``n``
    and ``unanswered``."""
    data = files.read_json(annotations_path, "TextVQA_0.5.1_val.json")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise InputError(f'{annotations_path}: expected {{"data": [...]}}')
    annotations = {}
    for i, record in enumerate(data["data"]):
        where = f"{annotations_path}: data[{i}]"
        files.check_fields(where, record, ("image_id", "question", "answers"))
        if not isinstance(record["answers"], list) or len(record["answers"]) != 10:
            raise InputError(f"{where}: answers must be the 10 human answers")
        annotations[(record["image_id"], record["question"].lower())] = record
    scores = []
    for where, line in files.read_answer_lines(answers_path, ("question_id", "prompt", "text")):
        key = (line["question_id"], textvqa_question(line["prompt"], where))
        if key not in annotations:
            raise InputError(f"{where}: no question {key[1]!r} about image {key[0]!r} in "
                             f"{annotations_path}")
        scores.append(textvqa_accuracy(line["text"], annotations[key]["answers"]))
    return {**files.mean(scores), "unanswered": len(annotations) - len(scores)}


def _textvqa_finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    annotations = files.require(f"{layout.data}/TextVQA_0.5.1_val.json",
                                "the TextVQA val annotations")
    return finish_with_score(layout, lines, lambda path: score_textvqa(path, annotations),
                             lambda result: accuracy_lines("textvqa", result))


VQAV2 = Benchmark("vqav2", reader("llava_vqav2_mscoco_{split}.jsonl", "test2015",
                                  "the LLaVA VQAv2 question file"),
                  _vqav2_finish, max_new_tokens=128, split="test-dev2015",
                  score=accuracy_score("vqav2", score_vqav2))
VIZWIZ = Benchmark("vizwiz", reader("llava_{split}.jsonl", "{split}",
                                    "the LLaVA VizWiz question file"),
                   _vizwiz_finish, max_new_tokens=128, split="test")
TEXTVQA = Benchmark("textvqa", reader("llava_textvqa_val_v051_ocr.jsonl", "train_images",
                                      "the LLaVA TextVQA question file (with OCR tokens)"),
                    _textvqa_finish, max_new_tokens=128, split="val",
                    score=accuracy_score("textvqa", score_textvqa))
