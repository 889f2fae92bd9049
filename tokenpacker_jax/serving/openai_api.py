"""OpenAI chat-completion requests in, checked; OpenAI-shaped answers and errors out.

``parse_chat_request(body, ...)`` turns the JSON body of ``POST /v1/chat/completions`` into
a ``ChatJob`` (the conversation's turns, its image, sampling and limits) or raises
``ApiError`` (an HTTP status and the OpenAI error body: message, type, param, code).

Messages: ``system`` (the template's system prompt), then ``user`` / ``assistant``
alternating, ending with ``user``. Content is a string or a list of parts: ``text`` and
``image_url`` (``data:`` URLs; a local file path or ``file://`` URL only when the server
names a folder for them, and only inside it). One image per conversation (the templates
hold one), in a user message, placed at its front as the reference does.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import secrets
import time
import urllib.parse
import uuid
from typing import Any

from PIL import Image

from tokenpacker_jax.data.conversation import ASSISTANT, USER, Turn, place_image
from tokenpacker_jax.serving.engine import Sampling

MAX_STOP_STRINGS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                       code, kind)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass
class ChatJob:
    turns: list[Turn]
    image: Image.Image | None
    system: str | None
    sampling: Sampling
    max_tokens: int | None  # None: as many as the context leaves
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """max_bytes: the largest image (encoded) a request may carry. local_folder: where
    local paths may point (None: no local paths)."""

    max_bytes: int = 20 * 2**20
    local_folder: str | None = None


def _number(body: dict, name: str, kind: type, default: Any, low: float | None = None,
            high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float
                                                 else int):
        raise ApiError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'},"
                            f" got {value!r:.40}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"'{name}' must be {bounds}, got {value}", name)
    return kind(value)


def _decode_image(data: bytes, where: str, policy: ImagePolicy) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise ApiError(413, f"{where}: the image has {len(data)} bytes, more than the limit "
                            f"of {policy.max_bytes}", where, "image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ApiError(400, f"{where}: not an image ({err})", where, "invalid_image") from err


def load_image_url(url: Any, where: str, policy: ImagePolicy) -> Image.Image:
    """A ``data:`` URL, or a local path inside ``policy.local_folder`` -> PIL image."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}: expected a URL string", where)
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, f"{where}: expected data:<type>;base64,<data>", where,
                           "invalid_image")
        if not header[5:].startswith("image/"):
            raise ApiError(400, f"{where}: {header[5:-7] or 'no type'} is not an image type",
                           where, "invalid_image")
        if len(payload) * 3 // 4 > policy.max_bytes:
            raise ApiError(413, f"{where}: the image is larger than the limit of "
                                f"{policy.max_bytes} bytes", where, "image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ApiError(400, f"{where}: the data is not base64 ({err})", where,
                           "invalid_image") from err
        return _decode_image(data, where, policy)
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("http", "https"):
        raise ApiError(400, f"{where}: the server does not fetch URLs; send the image as a "
                            f"data: URL", where, "invalid_image")
    if scheme not in ("", "file"):
        raise ApiError(400, f"{where}: unsupported URL scheme {scheme!r}", where,
                       "invalid_image")
    if policy.local_folder is None:
        raise ApiError(400, f"{where}: local image paths are off (start the server with "
                            f"--local_images=FOLDER); send a data: URL", where,
                       "invalid_image")
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if scheme == "file" else url
    folder = os.path.realpath(policy.local_folder)
    path = os.path.realpath(os.path.join(folder, path))
    if os.path.commonpath([folder, path]) != folder:
        raise ApiError(400, f"{where}: {url} is outside the folder the server reads images "
                            f"from", where, "invalid_image")
    try:
        with open(path, "rb") as file:
            data = file.read(policy.max_bytes + 1)
    except OSError as err:
        raise ApiError(400, f"{where}: cannot read {url} ({err.strerror})", where,
                       "invalid_image") from err
    return _decode_image(data, where, policy)


def _message_content(message: dict, where: str, policy: ImagePolicy
                     ) -> tuple[str, list[Image.Image]]:
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts",
                       f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            images.append(load_image_url(url, f"{at}.image_url", policy))
        else:
            raise ApiError(400, f"{at}: parts are text or image_url, got "
                                f"{kind if kind else repr(part)[:60]}", at, "invalid_part")
    return "\n".join(texts), images


def parse_messages(messages: Any, policy: ImagePolicy, max_images: int = 1
                   ) -> tuple[list[Turn], Image.Image | None, str | None]:
    """OpenAI messages -> (turns ending with the user's, the image or None, the system
    prompt or None)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    system, turns, image = None, [], None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", where)
        role = message.get("role")
        text, images = _message_content(message, where, policy)
        if role in ("system", "developer"):
            if turns or system is not None or images:
                raise ApiError(400, f"{where}: one system message, first, without images",
                               where)
            system = text
            continue
        expected = USER if len(turns) % 2 == 0 else ASSISTANT
        if role not in (USER, ASSISTANT):
            raise ApiError(400, f"{where}: role {role!r} is not system, user or assistant",
                           f"{where}.role")
        if role != expected:
            raise ApiError(400, f"{where}: expected a {expected} message (user and assistant "
                                f"take turns, starting with the user)", f"{where}.role")
        if images and role != USER:
            raise ApiError(400, f"{where}: images go in user messages", where)
        if images:
            if image is not None or len(images) > max_images:
                raise ApiError(400, f"the conversation holds more than {max_images} "
                                    f"image{'s' if max_images > 1 else ''}; the template "
                                    f"takes {max_images}", where, "too_many_images")
            image = images[0]
            text = place_image(text)
        turns.append(Turn(role, text))
    if not turns or turns[-1].role != USER:
        raise ApiError(400, "the last message must be the user's", "messages")
    return turns, image, system


def parse_chat_request(body: Any, model_name: str, policy: ImagePolicy) -> ChatJob:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = body.get("model")
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server has "
                            f"{model_name!r}", "model", "model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "'n' must be 1 (one answer per request)", "n")
    if body.get("logprobs"):
        raise ApiError(400, "logprobs are not supported", "logprobs")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": limit}, "max_tokens", int, None, low=1)
    temperature = _number(body, "temperature", float, 1.0, low=0.0, high=2.0)
    top_p = _number(body, "top_p", float, 1.0, low=0.0, high=1.0)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be above 0", "top_p")
    seed = _number(body, "seed", int, None)
    if seed is None:
        seed = secrets.randbits(31)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif (isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS
          and all(isinstance(s, str) for s in stop)):
        stop = tuple(stop)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} "
                            f"strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    turns, image, system = parse_messages(body.get("messages"), policy)
    return ChatJob(turns, image, system,
                   Sampling(temperature=temperature, top_p=top_p, seed=seed % 2**32),
                   max_tokens, stop, stream,
                   bool(isinstance(options, dict) and options.get("include_usage")))


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None,
          usage_: dict | None = None, choices: bool = True) -> dict[str, Any]:
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
           "model": model, "system_fingerprint": None,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                        "logprobs": None}] if choices else []}
    if usage_ is not None:
        out["usage"] = usage_
    return out
