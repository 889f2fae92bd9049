"""A decoding engine driven one step at a time from the host: continuous batching over the
rows of one KV cache, tokens out as they are decoded.

The engine owns a cache of B rows ("slots") x S positions (``EngineConfig.slots``,
``max_length``). A row is free, live (decoding a request) or parked (holding a finished
turn of a conversation whose next turn may reuse it). One ``step``:

1. admits waiting requests into free rows. Prompts are left-padded to a length bucket L
   and prefilled up to P at a time (``prefill_rows``; a compiled program per bucket and per
   power of two up to P, so that one arrival does not pay for P rows), and
   each row's L slots are written at [index - L, index): every prompt ends just before the
   shared write slot ``index``, so the rows decode in lockstep from then on. The first
   token is sampled from the prefill's logits;
2. feeds every row one token (a live row's last token; a pad elsewhere, whose write is
   undone: its slot keeps position -1 and the row's next position does not move) and
   samples the next one: one compiled program over [B] rows.

Requests join between steps (continuous batching) and leave when they stop (a stop token,
``max_new_tokens``, or ``cancel``). ``index`` only moves forward; when the rows' remaining
budgets would run past S, or a new prompt needs more room before ``index``, the cache moves
along the slot axis (one compiled program; RoPE positions belong to the tokens, the slots
only order them, so nothing a row computes changes).

A parked row's next turn (``Request.reuse``) is fed as forced decode steps when its prompt
starts with exactly the tokens in the row's cache (the earlier turns, their answers fed
back): only the new text is run. Otherwise (or when there is no room) it is prefilled
anew. A parked row is given up when a free row is needed or a shift would cut it.

The programs themselves are ``serving.cache_rows``. Shapes: the cache is ``KVCache``
(per-layer [B*K, S, H] arrays with the unscanned decoder, the CPU default as in
``generate.Generator``; else [L, B, S, K, H] stacks); prompts are ``data.prompt.Prompt``
(ids [l], image_mask [l], pixel_values [N, s, s, 3]). Greedy decoding gives ``Generator``'s
tokens: the same prefill and decode steps, on more (masked) slots.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tokenpacker_jax.data.prompt import Prompt, left_pad
from tokenpacker_jax.generate import bucket_length, unscanned
from tokenpacker_jax.models import mllm
from tokenpacker_jax.models.kv_cache import KVCache, init_cache
from tokenpacker_jax.serving import cache_rows

LIVE, PARKED = "live", "parked"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """slots: rows decoded together (B). max_length: cache positions per row (S): prompt
    plus answer. buckets: prompt lengths compiled for (each a program; a prompt is padded
    to the smallest that holds it). prefill_rows: the most prompts prefilled together (P;
    programs for 1, 2, 4, ... rows up to P)."""

    slots: int = 8
    max_length: int = 512
    buckets: tuple[int, ...] = (64, 128, 256)
    prefill_rows: int = 4

    def __post_init__(self):
        buckets = tuple(sorted({int(b) for b in self.buckets}))
        object.__setattr__(self, "buckets", buckets)
        if self.slots < 1 or self.prefill_rows < 1:
            raise ValueError(f"slots ({self.slots}) and prefill_rows ({self.prefill_rows}) "
                             f"must be at least 1")
        if not buckets or buckets[0] < 1 or buckets[-1] >= self.max_length:
            raise ValueError(f"prompt buckets {buckets} must lie in [1, max_length "
                             f"{self.max_length})")

    @classmethod
    def default_buckets(cls, max_length: int, smallest: int = 64) -> tuple[int, ...]:
        """Powers of two from ``smallest`` up to half of ``max_length``."""
        buckets, length = [], smallest
        while length <= max_length // 2:
            buckets.append(length)
            length *= 2
        return tuple(buckets) or (bucket_length(max_length // 2, 8),)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Per request: temperature 0 is greedy; top_k 0 and top_p 1 cut nothing; the seed
    makes a sampled answer reproducible whatever else is in the batch."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


class Request:
    """One prompt to answer. ``stop_ids``: tokens that end the answer (not part of it);
    default: the engine's. ``keep``: park the row when done, for ``reuse`` by the next turn
    of the same conversation (a finished request with ``keep``)."""

    _ids = itertools.count()

    def __init__(self, prompt: Prompt, max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] | None = None, keep: bool = False,
                 reuse: Request | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.id = next(self._ids)
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.sampling = sampling
        self.stop_ids = None if stop_ids is None else frozenset(int(t) for t in stop_ids)
        self.keep = keep
        self.reuse = reuse
        self.tokens: list[int] = []  # generated so far (a stop token is not kept)
        self.finish_reason: str | None = None  # stop | length | cancelled
        self.reused_tokens = 0  # prompt tokens taken from a parked row's cache
        self.cancelled = threading.Event()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Thread-safe: the engine drops the request at its next step."""
        self.cancelled.set()


@dataclasses.dataclass
class Event:
    """What one step did for a request: a new token (None when it finished without one)
    and, on its last event, why it finished."""

    request: Request
    token: int | None
    finish_reason: str | None = None


@dataclasses.dataclass
class _Row:
    request: Request
    state: str
    first: int  # first slot holding one of its tokens
    budget: int  # decode steps it may still take (each writes one slot)
    next_input: int | None = None  # the token to feed at the next step
    forced: collections.deque = dataclasses.field(default_factory=collections.deque)
    context_ids: list[int] = dataclasses.field(default_factory=list)  # ids in its cache
    context_visual: list[bool] = dataclasses.field(default_factory=list)
    pixels: np.ndarray | None = None


class Engine:
    """See the module docstring. ``submit`` and ``Request.cancel`` may be called from any
    thread; ``step`` (and everything else) from one thread at a time."""

    def __init__(self, model: mllm.MultimodalLM, params: Any, stop_ids: Sequence[int],
                 pad_id: int, config: EngineConfig = EngineConfig(),
                 unstack_layers: bool | None = None):
        if unstack_layers is None:
            unstack_layers = jax.default_backend() == "cpu"
        if unstack_layers and model.config.decoder.scan_layers:
            model, params = unscanned(model, params)
        self.model, self.params = model, params
        self.config = config
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.pad_id = int(pad_id)
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._rows: list[_Row | None] = [None] * config.slots
        self._programs: dict[Any, Any] = {}
        self.cache = self._empty_cache()
        self.index = 0  # the shared write slot (mirrors cache.index)
        self.steps = 0  # decode steps run
        self.rows_decoded = 0  # live rows summed over the steps (/ steps: the mean batch)
        self.prefills = 0  # admit program calls
        self.shifts = 0


    def submit(self, request: Request) -> Request:
        """Queues a request (checked here: its prompt and answer must fit the cache)."""
        self.check_fits(len(request.prompt.ids), request.max_new_tokens)
        with self._lock:
            self._waiting.append(request)
        return request

    def check_fits(self, prompt_length: int, max_new_tokens: int) -> None:
        """ValueError unless a prompt of this length and answer fit one row."""
        largest = self.config.buckets[-1]
        if prompt_length > largest:
            raise ValueError(f"the prompt has {prompt_length} tokens, more than the longest "
                             f"prompt this engine takes ({largest})")
        bucket = self.bucket(prompt_length)
        if bucket + max_new_tokens - 1 > self.config.max_length:
            raise ValueError(f"a prompt of {prompt_length} tokens (bucket {bucket}) and "
                             f"{max_new_tokens} new tokens do not fit the context of "
                             f"{self.config.max_length} positions")

    def bucket(self, prompt_length: int) -> int:
        return next(b for b in self.config.buckets if b >= prompt_length)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def live(self) -> int:
        return sum(row is not None and row.state == LIVE for row in self._rows)

    @property
    def busy(self) -> bool:
        return self.live > 0 or self.waiting > 0

    def release(self, request: Request) -> None:
        """Frees the row a finished request with ``keep`` holds."""
        for i, row in enumerate(self._rows):
            if row is not None and row.request is request and row.state == PARKED:
                self._rows[i] = None


    def _empty_cache(self) -> KVCache:
        cache = init_cache(self.model.config.decoder, self.config.slots,
                           self.config.max_length)
        return cache.per_layer() if not self.model.config.decoder.scan_layers else cache

    def _row_arrays(self, n: int) -> dict[str, np.ndarray]:
        return {"seeds": np.zeros(n, np.uint32), "temperature": np.zeros(n, np.float32),
                "top_k": np.zeros(n, np.int32), "top_p": np.ones(n, np.float32)}

    @property
    def prefill_sizes(self) -> tuple[int, ...]:
        """Row counts the admit programs are compiled for: powers of two, then P."""
        sizes, n = [], 1
        while n < self.config.prefill_rows:
            sizes.append(n)
            n *= 2
        return (*sizes, self.config.prefill_rows)

    def _example_prompts(self, length: int, rows: int) -> dict[str, np.ndarray]:
        cfg = self.model.config
        size = cfg.vision.image_size
        tiles = self._tiles
        prompt = Prompt(np.full(length, self.pad_id, np.int32), np.zeros(length, bool),
                        np.zeros((tiles, size, size, cfg.vision.num_channels), np.float32),
                        np.zeros(tiles, bool))
        return left_pad([prompt] * rows, self.pad_id, length)

    def compile(self, tiles: int = 1) -> None:
        """Builds every program now (the step, the shift, the admits: one per bucket and
        row count) for prompts of ``tiles`` image tiles each, and runs each once (a
        program's first run pays one-time costs)."""
        self._tiles = tiles
        b = self.config.slots
        if ("step",) not in self._programs:
            slots = self._row_arrays(b)
            decode = functools.partial(cache_rows.decode, self.model)
            self._programs["step",] = jax.jit(decode, donate_argnums=1).lower(
                self.params, self.cache, np.zeros(b, np.int32), np.zeros(b, bool),
                slots["seeds"], np.zeros(b, np.int32), slots["temperature"], slots["top_k"],
                slots["top_p"]).compile()
            self._programs["shift",] = jax.jit(cache_rows.shift, donate_argnums=0).lower(
                self.cache, np.int32(0)).compile()
            # Pad rows only: nothing of it stays (the cache is made anew below).
            slots = self._row_arrays(b)
            _, self.cache = self._programs["step",](
                self.params, self.cache, np.zeros(b, np.int32), np.zeros(b, bool),
                slots["seeds"], np.zeros(b, np.int32), slots["temperature"], slots["top_k"],
                slots["top_p"])
            self.cache = self._programs["shift",](self.cache, np.int32(0))
        for length in self.config.buckets:
            for rows in self.prefill_sizes:
                key = ("admit", length, tiles, rows)
                if key in self._programs:
                    continue
                prompts, per_row = self._example_prompts(length, rows), self._row_arrays(rows)
                arguments = (np.full(rows, b, np.int32), np.int32(0), per_row["seeds"],
                             per_row["temperature"], per_row["top_k"], per_row["top_p"])
                admit = functools.partial(cache_rows.admit, self.model)
                self._programs[key] = jax.jit(admit, donate_argnums=1).lower(
                    self.params, self.cache, prompts, *arguments).compile()
                _, self.cache = self._programs[key](self.params, self.cache, prompts,
                                                    *arguments)  # rows out of range: no-op
        jax.block_until_ready(self.cache)
        if not any(row is not None for row in self._rows):
            self.cache, self.index = self._empty_cache(), 0

    def _program(self, *key):
        if key not in self._programs:
            raise RuntimeError(f"engine program {key} was not compiled (Engine.compile)")
        return self._programs[key]


    def _live_rows(self) -> list[_Row]:
        return [row for row in self._rows if row is not None and row.state == LIVE]

    def _shift(self, shift: int) -> None:
        if shift == 0:
            return
        if not any(row is not None for row in self._rows):  # nothing to keep: no copy
            # (a transfer: jnp.int32 would lower a conversion program while serving)
            self.cache = self.cache.replace(index=jax.device_put(np.int32(self.index - shift)))
        else:
            self.cache = self._program("shift")(self.cache, np.int32(shift))
            self.shifts += 1
        self.index -= shift
        for i, row in enumerate(self._rows):
            if row is None:
                continue
            row.first -= shift
            if row.first < 0:  # only parked rows can be cut (see _admission_shift)
                assert row.state == PARKED, "a shift cut a live row"
                self._rows[i] = None

    def _admission_shift(self, bucket: int, length: int, budget: int) -> int | None:
        """How far to shift the cache left so that a prompt of ``length`` tokens padded to
        ``bucket`` fits before ``index`` and every live row's budget (and ``budget``) after
        it; None if no shift does now."""
        live = self._live_rows()
        firsts = [row.first for row in live]
        budgets = [row.budget for row in live] + [budget]
        span = max([self.index - f for f in firsts] + [length]) + max(budgets)
        if span > self.config.max_length:
            return None
        low = self.index + max(budgets) - self.config.max_length
        high = min(firsts + [self.index - bucket]) if firsts else self.index - bucket
        if low > high:
            return None
        return min(max(0, low), high)

    def _free_row(self) -> int | None:
        free = [i for i, row in enumerate(self._rows) if row is None]
        if free:
            return free[0]
        parked = [i for i, row in enumerate(self._rows) if row.state == PARKED]
        if parked:  # the one parked longest (lowest first slot) is given up
            victim = min(parked, key=lambda i: self._rows[i].first)
            self._rows[victim] = None
            return victim
        return None

    def _try_reuse(self, request: Request) -> bool:
        """Continues a parked row with the new prompt's extra tokens, if it can."""
        previous = request.reuse
        index = next((i for i, row in enumerate(self._rows) if row is not None
                      and row.request is previous and row.state == PARKED), None)
        if index is None:
            return False
        row = self._rows[index]
        prompt = request.prompt
        n = len(row.context_ids)
        if (len(prompt.ids) <= n or prompt.ids[:n].tolist() != row.context_ids
                or prompt.image_mask[:n].tolist() != row.context_visual
                or prompt.image_mask[n:].any()
                or (row.pixels is not None
                    and not np.array_equal(row.pixels, prompt.pixel_values))):
            self._rows[index] = None  # the conversation changed: prefill it anew
            return False
        extra = prompt.ids[n:].tolist()
        budget = len(extra) + request.max_new_tokens - 1
        live = self._live_rows()
        span = max([self.index - r.first for r in live] + [self.index - row.first]) + max(
            [r.budget for r in live] + [budget])
        if span > self.config.max_length:
            self._rows[index] = None
            return False
        self._shift(max(0, self.index + max([r.budget for r in live] + [budget])
                        - self.config.max_length))
        row.request, row.state, row.budget = request, LIVE, budget
        row.forced = collections.deque(extra)
        row.next_input = row.forced.popleft()
        request.reused_tokens = n
        return True

    def _admit(self, events: list[Event]) -> None:
        """Moves waiting requests into rows, FIFO, prefilling them by bucket."""
        admitted: dict[int, list[tuple[int, Request]]] = collections.defaultdict(list)
        while True:
            with self._lock:
                if not self._waiting:
                    break
                request = self._waiting[0]
                if request.cancelled.is_set():
                    self._waiting.popleft()
                    request.finish_reason = "cancelled"
                    events.append(Event(request, None, "cancelled"))
                    continue
            if request.reuse is not None and self._try_reuse(request):
                with self._lock:
                    self._waiting.popleft()
                continue
            length = len(request.prompt.ids)
            bucket = self.bucket(length)
            shift = self._admission_shift(bucket, length, request.max_new_tokens - 1)
            row_index = None if shift is None else self._free_row()
            if row_index is None:
                break
            # (rows admitted earlier in this call move with the shift before their prefill
            # is written: it is written at the index of the time)
            self._shift(shift)
            with self._lock:
                self._waiting.popleft()
            self._rows[row_index] = _Row(
                request, LIVE, first=self.index - length,
                budget=request.max_new_tokens - 1,
                context_ids=request.prompt.ids.tolist(),
                context_visual=request.prompt.image_mask.tolist(),
                pixels=request.prompt.pixel_values if request.prompt.image_mask.any()
                else None)
            admitted[bucket].append((row_index, request))
            if len(admitted[bucket]) == self.config.prefill_rows:
                self._flush({bucket: admitted.pop(bucket)}, events)
        self._flush(admitted, events)

    def _flush(self, admitted: dict[int, list[tuple[int, Request]]],
               events: list[Event]) -> None:
        """Prefills the admitted prompts (one program call per bucket)."""
        for bucket, group in admitted.items():
            if not group:
                continue
            p = next(n for n in self.prefill_sizes if n >= len(group))
            prompts = [r.prompt for _, r in group]
            prompts += [prompts[0]] * (p - len(prompts))  # filler rows, written nowhere
            rows = np.full(p, self.config.slots, np.int32)  # out of range: dropped
            rows[:len(group)] = [i for i, _ in group]
            arrays = self._row_arrays(p)
            for k, (_, request) in enumerate(group):
                self._fill_sampling(arrays, k, request)
            tiles = prompts[0].pixel_values.shape[0]
            tokens, self.cache = self._program("admit", bucket, tiles, p)(
                self.params, self.cache, left_pad(prompts, self.pad_id, bucket), rows,
                np.int32(self.index - bucket), arrays["seeds"], arrays["temperature"],
                arrays["top_k"], arrays["top_p"])
            tokens = np.asarray(tokens)
            self.prefills += 1
            for k, (row_index, _) in enumerate(group):
                self._emit(row_index, int(tokens[k]), events)

    @staticmethod
    def _fill_sampling(arrays: dict[str, np.ndarray], k: int, request: Request) -> None:
        s = request.sampling
        arrays["seeds"][k] = np.uint32(s.seed % 2**32)
        arrays["temperature"][k] = s.temperature
        arrays["top_k"][k] = s.top_k
        arrays["top_p"][k] = s.top_p

    def _emit(self, row_index: int, token: int, events: list[Event]) -> None:
        """A token sampled for a row: hand it out, or end the request."""
        row = self._rows[row_index]
        request = row.request
        stops = self.stop_ids if request.stop_ids is None else request.stop_ids
        if token in stops:
            self._finish(row_index, "stop", events)
            return
        request.tokens.append(token)
        reason = "length" if len(request.tokens) >= request.max_new_tokens else None
        events.append(Event(request, token, reason))
        if reason:
            self._finish(row_index, reason, events, announced=True)
        else:
            row.next_input = token

    def _finish(self, row_index: int, reason: str, events: list[Event],
                announced: bool = False) -> None:
        row = self._rows[row_index]
        row.request.finish_reason = reason
        if not announced:
            events.append(Event(row.request, None, reason))
        if row.request.keep and reason != "cancelled":
            row.state, row.budget, row.next_input = PARKED, 0, None
        else:
            self._rows[row_index] = None

    def step(self) -> list[Event]:
        """Admits what fits, then decodes one token for every live row."""
        events: list[Event] = []
        for i, row in enumerate(self._rows):
            if row is not None and row.state == LIVE and row.request.cancelled.is_set():
                self._finish(i, "cancelled", events)
        self._admit(events)
        live = self._live_rows()
        if not live:
            return events
        self._shift(max(0, self.index + max(r.budget for r in live) - self.config.max_length))
        b = self.config.slots
        tokens = np.full(b, self.pad_id, np.int32)
        is_live = np.zeros(b, bool)
        counters = np.zeros(b, np.int32)
        arrays = self._row_arrays(b)
        for i, row in enumerate(self._rows):
            if row is None or row.state != LIVE:
                continue
            tokens[i], is_live[i] = row.next_input, True
            counters[i] = len(row.request.tokens)
            self._fill_sampling(arrays, i, row.request)
        out, self.cache = self._program("step")(
            self.params, self.cache, tokens, is_live, arrays["seeds"], counters,
            arrays["temperature"], arrays["top_k"], arrays["top_p"])
        out = np.asarray(out)
        self.index += 1
        self.steps += 1
        self.rows_decoded += int(is_live.sum())
        for i, row in enumerate(self._rows):
            if row is None or row.state != LIVE:
                continue
            row.budget -= 1
            row.context_ids.append(int(tokens[i]))
            row.context_visual.append(False)
            if row.forced:
                row.next_input = row.forced.popleft()
            else:
                self._emit(i, int(out[i]), events)
        return events

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Submits ``requests`` and steps until all are done (for tests and scripts)."""
        for request in requests:
            self.submit(request)
        while not all(r.done for r in requests):
            self.step()
        return list(requests)
