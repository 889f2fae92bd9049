"""A checkpoint made ready to talk: the trained model, its prompt builder and a compiled
decoding engine, shared by ``tokenpacker_jax.chat`` and ``tokenpacker_jax.serve``."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from tokenpacker_jax.assembly import TrainedModel, load_trained
from tokenpacker_jax.data.conversation import Turn
from tokenpacker_jax.data.example import ExampleBuilder, example_builder
from tokenpacker_jax.data.prompt import Prompt, conversation_prompt
from tokenpacker_jax.serving.engine import Engine, EngineConfig
from tokenpacker_jax.user_error import InputError

DEFAULT_MAX_LENGTH = 2048  # the reference's context (tokenizer_model_max_length)


@dataclasses.dataclass
class ChatModel:
    trained: TrainedModel
    builder: ExampleBuilder
    engine: Engine
    name: str  # what clients call it: the run directory's name

    @property
    def template(self) -> str:
        return self.builder.conversation.template.name

    def prompt(self, turns: Sequence[Turn], image: Any = None,
               system: str | None = None) -> Prompt:
        return conversation_prompt(self.builder, turns, image, system)

    def room(self, prompt_length: int) -> int:
        """The most new tokens a prompt of this length leaves room for (0: it does not
        fit)."""
        if prompt_length > self.engine.config.buckets[-1]:
            return 0
        return self.engine.config.max_length - self.engine.bucket(prompt_length) + 1

    def decode(self, ids: Sequence[int]) -> str:
        return self.trained.tokenizer.decode(list(ids)).strip()


def add_engine_flags(parser: argparse.ArgumentParser, slots: int) -> None:
    parser.add_argument("--checkpoint", required=True, help="training run directory (its "
                                                            "newest checkpoint)")
    parser.add_argument("--max_length", type=int, default=0,
                        help="positions per conversation, prompt and answer (default: the "
                             f"LLM's, at most {DEFAULT_MAX_LENGTH})")
    parser.add_argument("--buckets", default="",
                        help="prompt lengths to compile for, comma-separated (default: "
                             "powers of two from 64 to half of --max_length)")
    parser.add_argument("--slots", type=int, default=slots,
                        help="conversations decoded together")
    parser.add_argument("--prefill_rows", type=int, default=0,
                        help="prompts prefilled together (default: min(slots, 4))")


def open_model(args: argparse.Namespace, *, compile_programs: bool = True) -> ChatModel:
    """Loads ``--checkpoint`` and builds (and compiles) the engine the flags describe."""
    if not os.path.isdir(args.checkpoint):
        raise InputError(f"--checkpoint {args.checkpoint}: not a directory")
    trained = load_trained(args.checkpoint)
    context = int(trained.config.model.decoder.get("max_position_embeddings",
                                                   DEFAULT_MAX_LENGTH))
    max_length = args.max_length or min(context, DEFAULT_MAX_LENGTH)
    if max_length > context:
        raise InputError(f"--max_length {max_length} is longer than the LLM's context "
                         f"({context})")
    try:
        buckets = (tuple(int(b) for b in args.buckets.split(",")) if args.buckets
                   else EngineConfig.default_buckets(max_length))
        config = EngineConfig(slots=args.slots, max_length=max_length, buckets=buckets,
                              prefill_rows=args.prefill_rows or min(args.slots, 4))
    except ValueError as err:  # a length that is no number, or lengths that do not fit
        raise InputError(f"--buckets {args.buckets!r} / --max_length {max_length} / "
                         f"--slots / --prefill_rows: {err}") from err
    tokenizer = trained.tokenizer
    builder = example_builder(trained.config.data, tokenizer, trained.tokens_per_tile)
    engine = Engine(trained.model, trained.params, tokenizer.stop_ids, tokenizer.pad_id,
                    config)
    if compile_programs:
        engine.compile(tiles=builder.image.max_tiles)
    name = os.path.basename(os.path.normpath(args.checkpoint))
    return ChatModel(trained, builder, engine, name)
