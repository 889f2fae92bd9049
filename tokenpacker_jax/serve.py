"""An OpenAI-compatible server for a checkpoint, with a web page, on uvicorn.

    python -m tokenpacker_jax.serve --checkpoint=WORKDIR [--host=127.0.0.1] [--port=8000]

``POST /v1/chat/completions`` (text and ``image_url`` parts, multi-turn ``messages``,
``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``), ``GET
/v1/models``, ``GET /health``, and at ``/`` a chat page with image upload, streamed answers
and TokenPacker's region maps over the image (``tokenpacker_jax/serving/``). Requests that
arrive together share the engine's prefill and decode steps, and new ones join between
decode steps (continuous batching over ``--slots`` rows). Every program (one prefill per
prompt-length bucket, the decode step, the cache shift, the region maps) is compiled
before the server listens. SIGTERM (or Ctrl-C) stops taking requests, finishes those in
flight, and exits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import uvicorn

from tokenpacker_jax import user_error
from tokenpacker_jax.serving.model import add_engine_flags, open_model
from tokenpacker_jax.serving.openai_api import ImagePolicy
from tokenpacker_jax.serving.server import ServerState, create_app


def parser() -> user_error.ArgumentParser:
    p = user_error.ArgumentParser(prog="python -m tokenpacker_jax.serve",
                                description=__doc__.split("\n\n")[0])
    add_engine_flags(p, slots=8)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_waiting", type=int, default=64,
                   help="requests that may wait for a row; more are answered 503")
    p.add_argument("--request_timeout", type=float, default=600.0,
                   help="seconds a request may wait and run before it is dropped (504)")
    p.add_argument("--max_tokens", type=int, default=512,
                   help="answer length limit when a request gives none")
    p.add_argument("--max_image_mb", type=float, default=20.0, help="largest image accepted")
    p.add_argument("--local_images", default=None,
                   help="a folder image_url may name files in (default: data: URLs only)")
    p.add_argument("--log_level", default="info", help="uvicorn's log level")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.local_images is not None and not os.path.isdir(args.local_images):
        raise user_error.InputError(f"--local_images {args.local_images}: not a directory")
    model = open_model(args)
    state = ServerState(
        model, max_waiting=args.max_waiting, request_timeout=args.request_timeout,
        images=ImagePolicy(int(args.max_image_mb * 2**20), args.local_images),
        default_max_tokens=args.max_tokens)
    state.region_mapper.compile()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: stop taking requests first
            if not state.draining:
                count = state.worker.in_flight
                print(f"stopping: finishing {count} request{'s' * (count != 1)} in flight",
                      flush=True)
            state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(state), host=args.host, port=args.port,
                            log_level=args.log_level,
                            timeout_graceful_shutdown=int(args.request_timeout) + 1)
    print(f"serving {model.name} ({model.template} template, {model.engine.config.slots} "
          f"rows) at http://{args.host}:{args.port}/ (OpenAI API under /v1)", flush=True)
    Server(config).run()


if __name__ == "__main__":
    user_error.run_argparse(main, "tokenpacker_jax.serve")
