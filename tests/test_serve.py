"""``python -m tokenpacker_jax.serve`` on the tiny model, driven by clients we did not
write: the ``openai`` client (answers equal ``generate``'s greedy answers, streamed and
not, requests in flight together; a 3-turn conversation equals the reference's prompt;
each bad request gets its OpenAI error and status), headless Chromium on the web page
(an image uploaded, the answer streamed, the region maps drawn); nothing compiled while
serving; SIGTERM finishing the request in flight. One server process for the whole file
(its last test stops it)."""

import argparse
import base64
import concurrent.futures
import io
import json
import signal
import threading
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from serving_helpers import QUESTIONS, reference_prompt_ids, reference_vicuna_prompt, write_tiny_run

from tokenpacker_jax.assembly import load_trained
from tokenpacker_jax.bench import serving as bench_serving
from tokenpacker_jax.data.conversation import ASSISTANT, USER, Turn, place_image
from tokenpacker_jax.data.example import example_builder
from tokenpacker_jax.data.image import load_image
from tokenpacker_jax.data.prompt import Prompt, conversation_prompt, left_pad
from tokenpacker_jax.generate import Generator, SamplingConfig, answer
from tokenpacker_jax.serving.launch import free_port, start_server, wait_healthy
from tokenpacker_jax.serving.model import add_engine_flags, open_model
from tokenpacker_jax.serving.openai_api import ApiError, ImagePolicy, load_image_url
from tokenpacker_jax.serving.server import ServerState, create_app

STEPS = 6
MAX_IMAGE_BYTES = 20_000


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    run_dir, data = run
    log = open(tmp_path_factory.mktemp("serve_log") / "server.log", "w+")
    try:
        process, url = start_server(
            [f"--checkpoint={run_dir}", "--slots=4", "--prefill_rows=2", "--max_length=160",
             "--buckets=64,128", f"--max_image_mb={MAX_IMAGE_BYTES / 2**20}",
             f"--local_images={data / 'images'}",
             "--log_level=warning"], log, deadline_s=300)
    except (RuntimeError, TimeoutError):
        log.seek(0)
        raise AssertionError(log.read()) from None
    yield dict(url=url, process=process, run_dir=run_dir, data=data, log=log)
    if process.poll() is None:
        process.kill()
        process.wait()
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def local(run):
    """The same run in this process, for the expected answers."""
    trained = load_trained(str(run[0]))
    builder = example_builder(trained.config.data, trained.tokenizer, trained.tokens_per_tile)
    generator = Generator(trained.model, trained.params, trained.tokenizer.stop_ids,
                          trained.tokenizer.pad_id, SamplingConfig(max_new_tokens=STEPS))
    return trained, builder, generator


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def user_message(text, image_path=None, url=None):
    """A user message with ``text`` and, if given, the image at ``image_path`` as a data URL
    (or as ``url``)."""
    if image_path is None and url is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url or data_url(image_path)}},
        {"type": "text", "text": text}]}


def ask(client, messages, **kwargs):
    kwargs = {"model": "run", "max_tokens": STEPS, "temperature": 0, **kwargs}
    if not kwargs.get("stream"):
        response = client.chat.completions.create(messages=messages, **kwargs)
        return response.choices[0].message.content, response.choices[0].finish_reason
    pieces, finish = [], None
    for chunk in client.chat.completions.create(messages=messages, **kwargs):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return "".join(pieces), finish


def test_greedy_answers_equal_generate_streamed_and_not(server, client, local):
    trained, builder, generator = local
    images = [server["data"] / f"images/test/0000{i}.png" for i in range(3)] + [None]
    expected = [answer(generator, builder, trained.tokenizer,
                       [(q, None if path is None else load_image(path))])[0]["text"]
                for q, path in zip(QUESTIONS, images, strict=True)]
    assert len(set(expected)) == len(expected)
    jobs = [(user_message(q, path), stream) for q, path in zip(QUESTIONS, images, strict=True)
            for stream in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # in flight together
        results = list(pool.map(lambda job: ask(client, [job[0]], stream=job[1]), jobs))
    assert results == [(text, "length") for text in expected for _ in range(2)]
    models = client.models.list()
    assert [m.id for m in models.data] == ["run"]


def test_three_turn_conversation_is_the_reference_prompt(server, client, local):
    trained, builder, generator = local
    image_path = server["data"] / "images/test/00001.png"
    questions = ["What digit is shown?", "Where is it?", "Describe this picture"]
    answers = ["seven", "in the top left"]
    # (the image by its path under the server's --local_images folder)
    messages = [user_message(questions[0], url="test/00001.png")]
    for question, reply in zip(questions[1:], answers, strict=True):
        messages += [{"role": "assistant", "content": reply}, user_message(question)]

    pixels, tile_mask, span, _ = builder.image_tiles(load_image(image_path))
    text = reference_vicuna_prompt(["<image>\n" + questions[0], *questions[1:]], answers)
    ids, visual = reference_prompt_ids(trained.tokenizer.hf, text, span)
    turns = [Turn(USER, place_image(questions[0])), Turn(ASSISTANT, answers[0]),
             Turn(USER, questions[1]), Turn(ASSISTANT, answers[1]), Turn(USER, questions[2])]
    ours = conversation_prompt(builder, turns, load_image(image_path))
    np.testing.assert_array_equal(ours.ids, ids)
    np.testing.assert_array_equal(ours.image_mask, visual)

    tokens = generator(left_pad([Prompt(ids, visual, pixels, tile_mask)], generator.pad_id,
                                128))["tokens"]
    expected = trained.tokenizer.decode(generator.strip(tokens)[0]).strip()
    response = client.chat.completions.create(model="run", messages=messages,
                                              max_tokens=STEPS, temperature=0)
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == len(ids)
    assert response.usage.completion_tokens == STEPS


def test_stop_strings_and_seeds(server, client):
    message = [user_message(QUESTIONS[0], server["data"] / "images/test/00000.png")]
    full, _ = ask(client, message)
    stop = " " + full.split(" ")[2]
    for stream in (False, True):
        assert ask(client, message, stop=[stop, "zzz"], stream=stream) == (
            full[:full.index(stop)].strip(), "stop")
    sampled = [ask(client, message, temperature=1.0, seed=seed, max_tokens=12)[0]
               for seed in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]


def post(url, body: bytes, content_type="application/json"):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def noise_png(side) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, client):
    image = data_url(server["data"] / "images/test/00000.png")
    url = f"{server['url']}/v1/chat/completions"

    def parts(*items):
        return [{"role": "user", "content": list(items)}]

    text = {"type": "text", "text": "What is shown?"}
    cases = {
        "unknown model": (404, "model_not_found", dict(model="gpt-4o")),
        "not an image part": (400, "invalid_part", dict(messages=parts(
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, text))),
        "a data URL of text": (400, "invalid_image", dict(messages=parts(
            {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}},
            text))),
        "bytes that are no image": (400, "invalid_image", dict(messages=parts(
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
            text))),
        "an image over the limit": (413, "image_too_large", dict(messages=parts(
            {"type": "image_url", "image_url": {"url": noise_png(200)}}, text))),
        "a URL to fetch": (400, "invalid_image", dict(messages=parts(
            {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}},
            text))),
        "a path outside --local_images": (400, "invalid_image", dict(messages=parts(
            {"type": "image_url", "image_url": {"url": "../../../../../etc/passwd"}}, text))),
        "an absolute path outside --local_images": (400, "invalid_image", dict(
            messages=parts({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
                           text))),
        "a missing file": (400, "invalid_image", dict(messages=parts(
            {"type": "image_url", "image_url": {"url": "test/nothing.png"}}, text))),
        "two images": (400, "too_many_images", dict(messages=parts(
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "image_url", "image_url": {"url": image}}, text))),
        "a prompt longer than the context": (400, "context_length_exceeded", dict(
            messages=[{"role": "user", "content": "red circle " * 200}])),
        "max_tokens past the context": (400, "context_length_exceeded",
                                        dict(max_tokens=150)),
        "negative max_tokens": (400, None, dict(max_tokens=-3)),
        "two user turns in a row": (400, None, dict(messages=[
            {"role": "user", "content": "a"}, {"role": "user", "content": "b"}])),
        "temperature out of range": (400, None, dict(temperature=7)),
    }
    for name, (status, code, change) in cases.items():
        body = {"model": "run", "messages": parts(text), "max_tokens": 4, **change}
        got, error = post(url, json.dumps(body).encode())
        assert got == status, (name, got, error)
        assert set(error) == {"error"} and error["error"]["code"] == code, (name, error)
        assert error["error"]["message"] and error["error"]["type"], (name, error)
    assert post(url, b'{"model": "run", "messages": [')[0] == 400
    assert post(url, b"\xff\xfe not json")[0] == 400
    assert post(f"{server['url']}/v1/nothing", b"{}")[0] == 404
    # The openai client sees the same errors as exceptions with the status.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=parts(text))
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="run", messages=parts(text), max_tokens=-1)
    # Still up, and a good request is answered.
    wait_healthy(f"{server['url']}/health", 5)
    assert ask(client, parts(text))[1] == "length"


def test_local_paths_only_inside_the_folder_named(tmp_path):
    folder, outside = tmp_path / "images", tmp_path / "secret.png"
    folder.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 0)).save(outside)
    (folder / "link.png").symlink_to(outside)
    policy = ImagePolicy(local_folder=str(folder))
    for url in ("red.png", str(folder / "red.png"), (folder / "red.png").as_uri()):
        assert load_image_url(url, "image", policy).getpixel((3, 3)) == (200, 10, 10), url
    for url in ("../secret.png", str(outside), outside.as_uri(), "link.png"):
        with pytest.raises(ApiError, match="outside the folder"):
            load_image_url(url, "image", policy)
    with pytest.raises(ApiError, match="local image paths are off"):
        load_image_url(str(folder / "red.png"), "image", ImagePolicy())


def test_queue_bound_and_timeout(run):
    """In this process, with the engine's thread not started: nothing is admitted, so the
    first request waits out its timeout (504) while a second finds the queue full (503)."""
    run_dir, _ = run
    flags = argparse.ArgumentParser()
    add_engine_flags(flags, slots=2)
    model = open_model(flags.parse_args([f"--checkpoint={run_dir}", "--max_length=160",
                                         "--buckets=128"]), compile_programs=False)
    state = ServerState(model, max_waiting=1, request_timeout=3.0, images=ImagePolicy(),
                        default_max_tokens=4)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), port=port, lifespan="off",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", 60)
        body = json.dumps({"model": "run", "messages": [{"role": "user", "content": "hi"}]})
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        queued = threading.Event()
        submit = model.engine.submit
        model.engine.submit = lambda request: (submit(request), queued.set())[0]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, url, body.encode())
            assert queued.wait(60), first.result()
            second = post(url, body.encode())
            assert second[0] == 503 and second[1]["error"]["code"] == "server_overloaded"
            status, error = first.result()
        assert status == 504 and error["error"]["code"] == "timeout"
    finally:
        server.should_exit = True
        thread.join(30)


def test_web_page_streams_an_answer_and_draws_region_maps(server, client, tmp_path):
    image_path = server["data"] / "images/test/00002.png"
    question = "Where is the red circle?"
    expected, _ = ask(client, [user_message(question, image_path)], max_tokens=12)

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=Service(executable_path="/usr/bin/chromedriver"))
    try:
        driver.get(server["url"] + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "run")
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("12")
        driver.find_element(By.ID, "image").send_keys(str(image_path))
        wait.until(lambda d: d.find_element(By.ID, "thumb").get_attribute("src"))
        driver.find_element(By.ID, "prompt").send_keys(question)
        driver.find_element(By.ID, "send").click()
        reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR,
                                                    ".assistant[data-done]"))
        assert reply.get_attribute("data-done") == "true", reply.text
        assert reply.find_element(By.CSS_SELECTOR, ".content").text == expected
        assert int(reply.get_attribute("data-chunks")) > 1  # it came in pieces
        maps = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "img.region-map"))
        wait.until(lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", maps[0]))
        assert len(maps) == 1  # one tile (pad mode)
        assert len(reply.find_elements(By.CSS_SELECTOR, ".heads img")) == 4  # heads
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()
    shot = Image.open(tmp_path / "page.png")
    assert shot.size[0] > 500


def test_the_load_benchmarks_clients_get_the_greedy_answers(server, local):
    """``bench.serving``'s questions and clients (2 at once) against this server: the
    answers its table checks, equal to ``generate``'s."""
    trained, builder, generator = local
    messages = bench_serving.questions(str(server["data"]), 4)
    result = bench_serving.load(server["url"], "run", messages, 2, STEPS)
    records = [json.loads(line) for line in
               (server["data"] / "test_questions.jsonl").read_text().splitlines()]
    expected = [answer(generator, builder, trained.tokenizer,
                       [(r["text"], load_image(server["data"] / r["image"]))])[0]["text"]
                for r in records[:4]]
    assert result["answers"] == expected and len(set(expected)) > 1


def test_nothing_is_compiled_while_serving(server, client):
    """Every program was built before the server listened: requests of every kind (after
    this file's others) lowered nothing to XLA."""
    image_path = server["data"] / "images/test/00003.png"
    assert ask(client, [user_message("red circle " * 10)], max_tokens=3)[1] == "length"
    ask(client, [user_message(QUESTIONS[1], image_path)], stop=["zzz"], stream=True)
    status, maps = post(f"{server['url']}/v1/region_maps",
                        json.dumps({"image": data_url(image_path)}).encode())
    assert status == 200 and len(maps["tiles"]) == 1
    with urllib.request.urlopen(f"{server['url']}/health", timeout=30) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["prefills"] > 0
    assert health["lowered_while_serving"] == []


def test_sigterm_finishes_the_request_in_flight(server, client):
    """The last test: it stops the file's server."""
    process = server["process"]
    stream = client.chat.completions.create(
        model="run", messages=[user_message("Describe this picture")], max_tokens=96,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].delta.role == "assistant"
    process.send_signal(signal.SIGTERM)
    rest = list(chunks)
    server["log"].seek(0)
    assert "stopping: finishing 1 request in flight" in server["log"].read()
    finish = [c.choices[0].finish_reason for c in rest if c.choices]
    assert finish[-1] == "length"
    assert rest[-1].usage.completion_tokens == 96
    # uvicorn shuts down gracefully, then re-raises the signal: the status says SIGTERM.
    assert process.wait(timeout=60) == -signal.SIGTERM
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{server['url']}/health", timeout=5)
