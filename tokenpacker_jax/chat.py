"""Multi-turn chat with a checkpoint in the terminal, as the reference's ``llava/serve/cli.py``.

    python -m tokenpacker_jax.chat --checkpoint=WORKDIR [--image=FILE]

Each question is answered with the whole conversation so far in the checkpoint's template
(the image in the first user turn), the answer printed as it is decoded. Commands:
``/image FILE`` starts a new conversation about another image, ``/clear`` starts a new one
about the same image, ``/quit`` (or end of input) leaves. The KV cache of the earlier turns
is kept: when the next prompt starts with exactly the tokens already in the cache (the
template renders earlier answers as they were decoded), only the new text is run, else the
conversation is prefilled again. The ``plain`` template (stage-1 checkpoints) holds one
question, so there each question is asked alone.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from tokenpacker_jax import user_error
from tokenpacker_jax.data.conversation import ASSISTANT, USER, Turn, place_image
from tokenpacker_jax.data.image import load_image
from tokenpacker_jax.serving.engine import Request, Sampling
from tokenpacker_jax.serving.model import ChatModel, add_engine_flags, open_model
from tokenpacker_jax.serving.text import TextStream

HELP = "commands: /image FILE (a new conversation about FILE), /clear, /quit"


class Chat:
    """One conversation at a time over a ``ChatModel`` (its engine's rows are this chat's)."""

    def __init__(self, model: ChatModel, sampling: Sampling, max_new_tokens: int,
                 out: TextIO = sys.stdout, debug: bool = False):
        self.model, self.sampling, self.max_new_tokens = model, sampling, max_new_tokens
        self.out, self.debug = out, debug
        self.image: Any = None
        self.history: list[Turn] = []
        self.last: Request | None = None  # holds the conversation's cache

    def clear(self) -> None:
        self.history = []
        if self.last is not None:
            self.model.engine.release(self.last)
        self.last = None

    def load_image(self, path: str) -> None:
        self.image = load_image(path)
        self.clear()

    def ask(self, question: str) -> str:
        """Answers ``question`` in the conversation, printing the answer as it comes."""
        if self.model.template == "plain":
            self.clear()  # one question per conversation
        text = place_image(question) if self.image is not None and not self.history \
            else question
        turns = self.history + [Turn(USER, text)]
        prompt = self.model.prompt(turns, self.image)
        room = self.model.room(len(prompt.ids))
        if room < 1:
            raise ValueError(f"the conversation ({len(prompt.ids)} tokens) is longer than the "
                             f"context allows: /clear to start again")
        request = Request(prompt, min(self.max_new_tokens, room), self.sampling, keep=True,
                          reuse=self.last)
        engine = self.model.engine
        engine.submit(request)
        stream = TextStream(self.model.trained.tokenizer)
        while not request.done:
            for event in engine.step():
                if event.token is not None:
                    self.out.write(stream.add(event.token))
                    self.out.flush()
        self.out.write(stream.finish() + "\n")
        if self.debug:
            self.out.write(f"[prompt {len(prompt.ids)} tokens, {request.reused_tokens} of them "
                           f"in the cache already; answer {len(request.tokens)} tokens, "
                           f"{request.finish_reason}]\n")
        self.out.flush()
        self.last = request  # (the engine reused or freed the previous turn's row)
        self.history = turns + [Turn(ASSISTANT, stream.text)]
        return stream.text


def parser() -> user_error.ArgumentParser:
    p = user_error.ArgumentParser(prog="python -m tokenpacker_jax.chat",
                                description=__doc__.split("\n\n")[0])
    add_engine_flags(p, slots=1)
    p.add_argument("--image", help="image file of the first conversation")
    p.add_argument("--max_new_tokens", type=int, default=512, help="answer length limit")
    p.add_argument("--temperature", type=float, default=0.2, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--debug", action="store_true",
                   help="after each answer, the prompt's length and how much of it was "
                        "in the KV cache already")
    return p


def run(chat: Chat, lines: TextIO) -> None:
    """The read-answer loop over ``lines`` (the terminal's input)."""
    out = chat.out
    while True:
        out.write(f"{USER.upper()}: ")
        out.flush()
        line = lines.readline()
        if not line:
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        try:
            if command == "/quit":
                return
            if command == "/clear":
                chat.clear()
                out.write("(a new conversation)\n")
            elif command == "/image":
                chat.load_image(argument.strip())
                out.write(f"(a new conversation about {argument.strip()})\n")
            elif command.startswith("/"):
                out.write(f"unknown command {command}; {HELP}\n")
            else:
                out.write(f"{ASSISTANT.upper()}: ")
                out.flush()
                chat.ask(line)
        except (ValueError, OSError) as err:  # this turn's mistake: the chat goes on
            out.write(f"\nerror: {user_error.one_line(err)}\n")


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    model = open_model(args)
    chat = Chat(model, Sampling(args.temperature, top_p=args.top_p, seed=args.seed),
                args.max_new_tokens, debug=args.debug)
    if args.image:
        chat.load_image(args.image)
    print(f"{model.name} ({model.template} template). {HELP}")
    run(chat, sys.stdin)


if __name__ == "__main__":
    user_error.run_argparse(main, "tokenpacker_jax.chat")
