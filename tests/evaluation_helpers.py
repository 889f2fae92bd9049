"""Writing the small annotation and answer files of the scorers' tests."""

import json


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def answers_file(path, texts):
    """An answer file as evaluate writes it: {question_id: text}."""
    return write_jsonl(path, [{"question_id": qid, "prompt": "?", "text": text,
                               "answer_id": str(i), "model_id": "m", "metadata": {}}
                              for i, (qid, text) in enumerate(texts.items())])
