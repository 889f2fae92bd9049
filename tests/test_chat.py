"""``python -m tokenpacker_jax.chat`` through a pseudo-terminal: a 3-turn conversation about
an image, each answer equal to ``Generator``'s greedy answer for the prompt the
reference's template builds from the conversation so far (its own string format,
tokenised by transformers as the reference's ``tokenizer_image_token`` does); then
``/clear``, ``/image`` (a new conversation about another image) and ``/quit``."""

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
from serving_helpers import reference_prompt_ids, reference_vicuna_prompt, write_tiny_run

from tokenpacker_jax import chat, user_error
from tokenpacker_jax.assembly import load_trained
from tokenpacker_jax.data.example import example_builder
from tokenpacker_jax.data.image import load_image
from tokenpacker_jax.data.prompt import Prompt, left_pad
from tokenpacker_jax.generate import Generator, SamplingConfig

STEPS = 6
QUESTIONS = ("What digit is shown?", "Where is the red circle?", "How many shapes are there?")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("chat"))


def expected_answers(run_dir, image_paths, turns):
    """Greedy answers, turn by turn, to the reference's prompts: for each image, its
    conversation's first ``turns`` turns."""
    trained = load_trained(str(run_dir))
    builder = example_builder(trained.config.data, trained.tokenizer, trained.tokens_per_tile)
    generator = Generator(trained.model, trained.params, trained.tokenizer.stop_ids,
                          trained.tokenizer.pad_id, SamplingConfig(max_new_tokens=STEPS))
    return [conversation_answers(trained, builder, generator, path, count)
            for path, count in zip(image_paths, turns, strict=True)]


def conversation_answers(trained, builder, generator, image_path, turns):
    pixels, tile_mask, span, _ = builder.image_tiles(load_image(image_path))
    questions = ["<image>\n" + QUESTIONS[0], *QUESTIONS[1:turns]]
    answers = []
    for turn in range(len(questions)):
        text = reference_vicuna_prompt(questions[:turn + 1], answers)
        ids, visual = reference_prompt_ids(trained.tokenizer.hf, text, span)
        batch = left_pad([Prompt(ids, visual, pixels, tile_mask)], generator.pad_id, 128)
        tokens = generator.strip(generator(batch)["tokens"])[0]
        answers.append(trained.tokenizer.decode(tokens).strip())
    return answers


class Terminal:
    """A process on a pseudo-terminal: what it printed, read up to a marker."""

    def __init__(self, argv):
        self.fd, child = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child,
                                        close_fds=True)
        os.close(child)
        self.buffer = b""

    def read_until(self, marker: bytes, deadline_s: float) -> bytes:
        deadline = time.monotonic() + deadline_s
        while marker not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None and not select.select(
                    [self.fd], [], [], 0)[0]:
                raise AssertionError(f"no {marker!r} from the chat; it printed:\n"
                                     f"{self.buffer.decode(errors='replace')}")
            if select.select([self.fd], [], [], left)[0]:
                try:
                    self.buffer += os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    continue
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def write(self, text: str) -> None:
        os.write(self.fd, text.encode())


def test_three_turns_in_a_terminal(run):
    run_dir, data = run
    image, other = data / "images/test/00000.png", data / "images/test/00002.png"
    expected, [other_expected] = expected_answers(run_dir, [image, other], [3, 1])
    assert len(set(expected)) == 3 and all(expected) and other_expected != expected[0]
    terminal = Terminal([sys.executable, "-m", "tokenpacker_jax.chat",
                         f"--checkpoint={run_dir}", f"--image={image}", "--temperature=0",
                         f"--max_new_tokens={STEPS}", "--debug",
                         # tests/test_serve.py's engine: compiled once for both files (the
                         # persistent compilation cache)
                         "--slots=4", "--prefill_rows=2", "--max_length=160", "--buckets=128"])
    try:
        terminal.read_until(b"USER: ", 240)
        answers, reused = [], []
        for question in QUESTIONS:
            terminal.write(question + "\n")
            terminal.read_until(b"ASSISTANT: ", 60)
            answer, debug = terminal.read_until(b"USER: ", 60).decode().split("[prompt ")
            answers.append(answer.strip())
            reused.append(int(re.search(r"tokens, (\d+) of them in the cache", debug)[1]))
        terminal.write("/clear\n")
        assert b"a new conversation" in terminal.read_until(b"USER: ", 30)
        # Another image: a new conversation, nothing of the last one's cache taken.
        terminal.write(f"/image {other}\n")
        assert b"a new conversation about" in terminal.read_until(b"USER: ", 30)
        terminal.write(QUESTIONS[0] + "\n")
        terminal.read_until(b"ASSISTANT: ", 60)
        other_answer, debug = terminal.read_until(b"USER: ", 60).decode().split("[prompt ")
        assert re.search(r"tokens, 0 of them in the cache", debug), debug
        terminal.write("/quit\n")
        assert terminal.process.wait(timeout=30) == 0
    finally:
        if terminal.process.poll() is None:
            terminal.process.kill()
        os.close(terminal.fd)
    assert answers == expected
    assert other_answer.strip() == other_expected
    # Turns 2 and 3 ran only their new text over the earlier turns' cache.
    assert reused[0] == 0 and 0 < reused[1] < reused[2]


def test_a_bad_checkpoint_is_one_line_on_stderr(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        user_error.run_argparse(chat.main, "tokenpacker_jax.chat",
                                [f"--checkpoint={tmp_path / 'missing'}"])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"tokenpacker_jax.chat: error: --checkpoint {tmp_path / 'missing'}: not a directory"]
