"""VQA answers as the official VQA evaluation and EvalAI compare them.

``vqa_punctuation`` and ``vqa_digits_articles`` are the official ``processPunctuation`` and
``processDigitArticle``; ``evalai_answer`` is EvalAI's answer processor, which LLaVA's
submissions and the m4c TextVQA evaluator apply to a model's answer. One question's accuracy
is the mean, over the subsets that leave one human out, of min(1, matching answers in the
subset / 3): ``vqa_accuracy`` as the official VQAv2 evaluation normalises (only when the
humans disagree), ``textvqa_accuracy`` as the m4c evaluator does (always, 10 humans).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenpacker_jax.user_error import InputError

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
