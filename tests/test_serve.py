"""serve.py through the official openai client on 127.0.0.1: replies against plain loops
(chatkit.py), OpenAI's response and chunk formats, bad requests, and test_ift.py's judge."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import openai
import pytest
import uvicorn
from click.testing import CliRunner

from chatkit import CHAT_MODEL, GPT2, plain_reply
from evalkit import one_torch_thread  # noqa: F401  (autouse fixture)
from evalkit import INSTRUCTION_DATA, assert_one_error_line, random_model, run_script, write_model

import serve
import test_ift
from token_data import get_tokenizer

MODEL_NAME = "tiny-chat"
TIMEOUT = 60  # seconds, for any one request


class ServerThread:
    """serve.py's app on a free port of 127.0.0.1, served by uvicorn in a thread of this process."""

    def __init__(self, model):
        self.model = model
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        app = serve.create_app(model, get_tokenizer("gpt2"), MODEL_NAME)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.socket.close()


@pytest.fixture(scope="module")
def server():
    with ServerThread(random_model(CHAT_MODEL, seed=4)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
CHAT_PROMPT = "System: Be brief.\nUser: Hello\nAssistant: "  # chat_format.py's plain-text format


def expected_usage(prompt, completion_tokens):
    prompt_tokens = len(GPT2.encode(prompt))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage_of(response):
    return {key: getattr(response.usage, key) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}


def test_chat_completion_is_the_greedy_reply(server, client):
    text, tokens, finish_reason = plain_reply(server.model, CHAT_PROMPT, 8, stop_text="\nUser:")
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=8)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == finish_reason and response.object == "chat.completion"
    assert usage_of(response) == expected_usage(CHAT_PROMPT, tokens)


def test_streamed_chat_completion_is_the_greedy_reply_in_chunks(server, client):
    text, tokens, finish_reason = plain_reply(server.model, CHAT_PROMPT, 8, stop_text="\nUser:")
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert "".join(deltas) == text and len(deltas) > 1
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == finish_reason
    assert chunks[-1].choices == [] and usage_of(chunks[-1]) == expected_usage(CHAT_PROMPT, tokens)
    assert {chunk.id for chunk in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_completions_greedy_seeded_and_streamed(server, client):
    prompt = "Every effort moves you"
    text, tokens, _ = plain_reply(server.model, prompt, 10)
    response = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=10)
    assert response.choices[0].text == text and usage_of(response) == expected_usage(prompt, tokens)
    streamed = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=10, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text
    # Sampling with a seed: the plain loop's draws from a generator seeded alike.
    sampled, _, _ = plain_reply(server.model, prompt, 10, temperature=0.9, seed=11)
    response = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0.9, max_tokens=10, seed=11)
    assert response.choices[0].text == sampled != text


def test_replies_stop_at_the_end_of_the_context(server, client):
    prompt = " ".join(["word"] * 60)  # 60 tokens of a context of 64: room for 4
    text, tokens, _ = plain_reply(server.model, prompt, 100)
    response = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0)
    assert tokens == 4 and response.choices[0].text == text and response.choices[0].finish_reason == "length"


def test_requests_take_turns(server, client):
    """Four requests at once: each gets its own reply, as if it were alone."""
    prompts = ["One", "Two", "Three", "Four"]
    replies = {}

    def ask(prompt):
        response = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=12, stream=True)
        replies[prompt] = "".join(chunk.choices[0].text for chunk in response)

    threads = [threading.Thread(target=ask, args=(prompt,)) for prompt in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert replies == {prompt: plain_reply(server.model, prompt, 12)[0] for prompt in prompts}


def test_a_client_that_leaves_mid_stream_frees_the_model(server, client):
    stream = client.completions.create(model=MODEL_NAME, prompt="Hi", temperature=0, max_tokens=60, stream=True)
    next(iter(stream))
    stream.close()
    text, _, _ = plain_reply(server.model, "Hello", 5)
    assert client.completions.create(model=MODEL_NAME, prompt="Hello", temperature=0, max_tokens=5).choices[0].text == text


def test_models_health_and_page(server, client):
    assert [model.id for model in client.models.list()] == [MODEL_NAME]
    assert json.loads(get(f"{server.url}/health")) == {"status": "ok", "model": MODEL_NAME}
    assert b"/v1/chat/completions" in get(f"{server.url}/")


def get(url):
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return response.read()


def post(url, data):
    """(status, JSON body) of a POST of `data` (bytes, or JSON)."""
    data = data if isinstance(data, bytes) else json.dumps(data).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]}
LONG_PROMPT = " ".join(["word"] * 64)
BAD_REQUESTS = {  # name: (path, body, status, param, code)
    "invalid JSON": ("chat/completions", b'{"model": "tiny-chat", "messages": [', 400, None, "invalid_json"),
    "not an object": ("completions", [1, 2], 400, None, None),
    "unknown model": ("chat/completions", {**CHAT, "model": "gpt-9"}, 404, "model", "model_not_found"),
    "no messages": ("chat/completions", {"model": MODEL_NAME}, 400, "messages", "invalid_value"),
    "unknown role": ("chat/completions", {**CHAT, "messages": [{"role": "bot", "content": "x"}]}, 400,
                     "messages[0]", "invalid_value"),
    "prompt longer than the context": ("completions", {"model": MODEL_NAME, "prompt": LONG_PROMPT}, 400,
                                       "prompt", "context_length_exceeded"),
    "chat longer than the context": ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONG_PROMPT}]},
                                     400, "messages", "context_length_exceeded"),
    "prompt plus max_tokens over the context": ("chat/completions", {**CHAT, "max_tokens": 60}, 400, "messages",
                                                "context_length_exceeded"),
    "max_tokens 0": ("completions", {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens",
                     "invalid_value"),
    "max_tokens over the context": ("chat/completions", {**CHAT, "max_tokens": 10**6}, 400, "max_tokens",
                                    "invalid_value"),
    "max_tokens not an integer": ("chat/completions", {**CHAT, "max_tokens": 2.5}, 400, "max_tokens", "invalid_value"),
    "temperature too high": ("chat/completions", {**CHAT, "temperature": 3}, 400, "temperature", "invalid_value"),
    "temperature a string": ("completions", {"model": MODEL_NAME, "prompt": "Hi", "temperature": "hot"}, 400,
                             "temperature", "invalid_value"),
    "top_p over 1": ("chat/completions", {**CHAT, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    "two choices": ("chat/completions", {**CHAT, "n": 2}, 400, "n", "invalid_value"),
    "empty prompt": ("completions", {"model": MODEL_NAME, "prompt": ""}, 400, "prompt", "invalid_value"),
    "JSON output": ("chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400,
                    "response_format", "unsupported_value"),
    "stream not a boolean": ("completions", {"model": MODEL_NAME, "prompt": "Hi", "stream": "yes"}, 400, "stream",
                             "invalid_value"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_openai_error_bodies(server, case):
    path, body, status, param, code = case
    got_status, got = post(f"{server.url}/v1/{path}", body)
    assert got_status == status
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}
    assert got["error"]["type"] == "invalid_request_error" and got["error"]["message"]
    assert (got["error"]["param"], got["error"]["code"]) == (param, code)


def test_the_client_raises_openai_errors_and_the_server_goes_on(server, client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert error.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT)
    assert post(f"{server.url}/v1/nowhere", {})[0] == 404
    assert client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).usage.completion_tokens <= 2


def test_ift_judge_uses_the_server(tmp_path):
    """test_ift.py's judge talks to serve.py: it drops the response_format the server refuses and
    gets the model's greedy reply, which from a random model is no judgement: reported as such."""
    item = json.loads(INSTRUCTION_DATA.read_text())[0]
    results = tmp_path / "alpha-ift-test-results.json"
    results.write_text(json.dumps({"name": "alpha", "items": [{**item, "model_response": "An answer."}]}))
    chat_prompt = f"User: {test_ift.judge_prompt(item, ['An answer.'])}\nAssistant: "
    judge_model = random_model({**CHAT_MODEL, "context_length": len(GPT2.encode(chat_prompt)) + 12})
    with ServerThread(judge_model) as judge:
        result = CliRunner().invoke(test_ift.cli, ["judge", str(results), "--base-url", f"{judge.url}/v1",
                                                   "--judge-model", MODEL_NAME, "--attempts", "1",
                                                   "--retries", "0", "--timeout", str(TIMEOUT)])
    reply, _, _ = plain_reply(judge_model, chat_prompt, 12, stop_text="\nUser:")
    assert "the judge endpoint rejects 'response_format'" in result.stderr
    assert f"malformed replies; last: no JSON object in the reply {reply!r}" in result.stderr
    assert result.exit_code == 2 and "error: every judgement failed" in result.stderr


def test_serve_refuses_a_missing_model_and_a_port_in_use(tmp_path):
    assert_one_error_line(run_script("serve.py", tmp_path / "no-such-run"), "no-such-run")
    model_json, weights, _ = write_model(tmp_path, CHAT_MODEL)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert_one_error_line(run_script("serve.py", model_json, weights, "--port", port),
                              f"cannot listen on 127.0.0.1:{port}", "--port")
