"""Load benchmark of ``python -m tokenpacker_jax.serve``: concurrent clients against batched
serving and against one request at a time, in the same run.

    python -m tokenpacker_jax.bench.serving [--checkpoint=W] [--clients=32] [--write]

Two servers of the same checkpoint (by default a random run of ``configs/tiny.py``'s model,
``serving.random_run``: speed does not depend on the weights): one decoding ``--clients``
rows together (continuous batching), one with a single row (requests served one at a time,
the others waiting). Each client sends ``--requests`` questions about the synthetic test
images one after another, greedy, ``--max_tokens`` each (plain HTTP/1.1 connections kept
alive: the ``openai`` client's own work would take a good part of two cores).
Rounds alternate between the servers (a machine whose speed drifts slows both alike); the
figures are the medians over rounds: requests/s and generated tokens/s (over the wall time
of the round), p50 and p99 latency (request sent to answer received). Every answer is
checked against the same question's greedy answer asked alone (one client, the one-row
server), so nothing was lost or mixed up. Compilation happens at the servers' start-up,
before any timing.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence

import numpy as np

from tokenpacker_jax import user_error
from tokenpacker_jax.bench import hardware, report
from tokenpacker_jax.serving import launch
from tokenpacker_jax.serving.random_run import add_run_flags, run_from_flags

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "BENCHMARKS.md")
TARGET_SPEEDUP = 3.0


def questions(data: str, count: int) -> list[dict]:
    """``count`` chat messages about the synthetic test images (cycling through them)."""
    with open(os.path.join(data, "test_questions.jsonl"), encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    out = []
    for record in (records * (count // len(records) + 1))[:count]:
        with open(os.path.join(data, record["image"]), "rb") as image:
            url = "data:image/png;base64," + base64.b64encode(image.read()).decode()
        out.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": record["text"]}]})
    return out


class Client:
    """One client's connection (HTTP/1.1, kept alive): a light client, so that the load
    generator's own CPU time does not crowd the server out on a small machine."""

    def __init__(self, url: str):
        address = urllib.parse.urlparse(url)
        self.connection = http.client.HTTPConnection(address.hostname, address.port,
                                                     timeout=600)

    def ask(self, model: str, message: dict, max_tokens: int) -> tuple[str, int, float]:
        """(answer, generated tokens, seconds from sending to the whole answer)."""
        body = json.dumps({"model": model, "messages": [message], "temperature": 0,
                           "max_tokens": max_tokens})
        start = time.perf_counter()
        self.connection.request("POST", "/v1/chat/completions", body,
                                {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = json.loads(response.read())
        seconds = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {payload}")
        return (payload["choices"][0]["message"]["content"],
                payload["usage"]["completion_tokens"], seconds)


def load(url: str, model: str, messages: list[dict], clients: int,
         max_tokens: int) -> dict:
    """``clients`` threads, each asking its share of ``messages`` in turn."""
    shares = [list(range(c, len(messages), clients)) for c in range(clients)]
    answers: list[str | None] = [None] * len(messages)
    tokens, latencies = [0] * len(messages), [0.0] * len(messages)

    def run_client(indices):
        connection = Client(url)
        for i in indices:
            answers[i], tokens[i], latencies[i] = connection.ask(model, messages[i],
                                                                 max_tokens)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(run_client, shares))
    wall = time.perf_counter() - start
    return dict(answers=answers, wall=wall, requests_per_s=len(messages) / wall,
                tokens_per_s=sum(tokens) / wall, p50=float(np.percentile(latencies, 50)),
                p99=float(np.percentile(latencies, 99)), tokens=sum(tokens))


def run(checkpoint: str, data: str, clients: int, requests: int,
        max_tokens: int, rounds: int, workdir: str, log=print) -> report.Section:
    messages = questions(data, clients * requests)
    model = os.path.basename(os.path.normpath(checkpoint))
    engine = ["--max_length=128", "--buckets=64", f"--max_waiting={len(messages)}",
              "--log_level=warning", f"--checkpoint={checkpoint}"]
    modes = {"batched": [f"--slots={clients}", f"--prefill_rows={min(clients, 8)}"],
             "one at a time": ["--slots=1", "--prefill_rows=1"]}
    servers = {}
    logs = []
    try:
        for mode, flags in modes.items():
            logs.append(open(os.path.join(workdir, f"server {mode}.log"), "w"))
            start = time.perf_counter()
            servers[mode] = launch.start_server(flags + engine, logs[-1])
            log(f"{mode} server up in {time.perf_counter() - start:.0f} s (compiled)")
        # The answers alone: each distinct question once, one client, one row.
        distinct = {json.dumps(m, sort_keys=True): m for m in messages}
        alone_client = Client(servers["one at a time"][1])
        alone = {key: alone_client.ask(model, m, max_tokens)[0]
                 for key, m in distinct.items()}
        expected = [alone[json.dumps(m, sort_keys=True)] for m in messages]
        results = {mode: [] for mode in modes}
        for r in range(rounds):
            for mode in modes:
                result = load(servers[mode][1], model, messages, clients, max_tokens)
                result["equal"] = sum(a == e for a, e in zip(result["answers"], expected,
                                                              strict=True))
                results[mode].append(result)
                log(f"round {r + 1} {mode}: {result['wall']:.1f} s, "
                    f"{result['requests_per_s']:.2f} requests/s, "
                    f"{result['tokens_per_s']:.0f} tokens/s, p50 {result['p50']:.2f} s, "
                    f"p99 {result['p99']:.2f} s, {result['equal']}/{len(messages)} equal")
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(60)
        for file in logs:
            file.close()

    def median(mode, key):
        return statistics.median(r[key] for r in results[mode])

    rows, total = [], len(messages)
    for mode, flags in modes.items():
        equal = min(r["equal"] for r in results[mode])
        rows.append([mode, flags[0].split("=")[1], f"{median(mode, 'wall'):.1f}",
                     f"{median(mode, 'requests_per_s'):.2f}",
                     f"{median(mode, 'tokens_per_s'):.0f}", f"{median(mode, 'p50'):.2f}",
                     f"{median(mode, 'p99'):.2f}", f"{equal}/{total}"])
    speedup = median("batched", "tokens_per_s") / median("one at a time", "tokens_per_s")
    all_equal = all(r["equal"] == total for mode in modes for r in results[mode])
    command = (f"`python -m tokenpacker_jax.bench.serving --clients={clients} "
               f"--requests={requests} --max_tokens={max_tokens} --rounds={rounds}`")
    setup = (f"{command}: {clients} clients, each asking {requests} questions about the "
             f"synthetic test images in turn ({total} requests, greedy, {max_tokens} new "
             f"tokens each; prompts padded to 64 positions), against a server decoding "
             f"{clients} rows together and one decoding a single row; medians of {rounds} "
             f"rounds, the two servers in turns. {hardware.machine()}.")
    table = report.markdown_table(
        ["serving", "rows", "wall s", "requests/s", "generated tokens/s", "p50 latency s",
         "p99 latency s", "answers equal to alone"], rows)
    verdicts = (f"Batched throughput {speedup:.1f}x one at a time (target at least "
                f"{TARGET_SPEEDUP:.0f}x: {report.verdict(speedup >= TARGET_SPEEDUP)}); every "
                f"answer equal to its greedy answer asked alone: {report.verdict(all_equal)}.")
    body = "\n\n".join([setup, table, verdicts])
    return report.Section("serving", "Serving under load", body)


def main(argv: Sequence[str] | None = None) -> None:
    parser = user_error.ArgumentParser(prog="python -m tokenpacker_jax.bench.serving",
                                     description=__doc__.split("\n\n")[0])
    add_run_flags(parser)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", nargs="?", const=BENCHMARKS, default=None, metavar="FILE",
                        help=f"update the section in FILE (default {BENCHMARKS})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint, data = run_from_flags(parser, args, workdir, images=16)
        section = run(checkpoint, data, args.clients, args.requests,
                      args.max_tokens, args.rounds, workdir,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.write:
        report.update_section(args.write, section)
        print(f"updated section 'serving' of {args.write}", file=sys.stderr)
    else:
        print(section.markdown())


if __name__ == "__main__":
    user_error.run_argparse(main, "tokenpacker_jax.bench.serving")
