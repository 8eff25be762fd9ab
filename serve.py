"""Serve a model over an OpenAI-compatible HTTP API, with a chat page at `/`.

    uv run serve.py my-run                          # http://127.0.0.1:8000
    uv run serve.py my-run latest --host 0.0.0.0 --port 8080

Endpoints: POST /v1/chat/completions and /v1/completions (`"stream": true` sends
server-sent events, OpenAI's chunks, ending with `data: [DONE]`), GET /v1/models,
GET /health, and the chat page at GET /. The model's name is the run's (--model-name
changes it); requests for another model are refused.

One generation at a time: requests wait, in arrival order, for an asyncio lock, and
the model's steps run on one worker thread, so that the server keeps answering
(/health, new requests, streams) while the model computes.
"""

import asyncio
import json
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from chat_format import ROLE_LABELS, render_chat
from errors import UserError, report_user_errors
from eval_common import load_tokenizer, pick_device, threads_option, tokenizer_options
from generation import Sampling, TextStream
from model_source import GRAMMAR, load_model, model_arguments, resolve_model

CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_TEXTS = 4


class RequestError(Exception):
    """A request the server refuses: an OpenAI-style error body with `status`."""

    def __init__(self, message, param=None, code=None, status=400, error_type="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.error_type = status, param, code, error_type

    def response(self):
        body = {"message": str(self), "type": self.error_type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


@dataclass(frozen=True)
class Job:
    """A validated request: what to generate and how."""
    prompt_ids: list
    stop_ids: tuple
    stop_texts: tuple
    max_tokens: int
    sampling: Sampling
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------- request fields

def number_field(body, name, default, low, high, integer=False):
    """body[name] (default when absent or null), a number from `low` to `high`."""
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise RequestError(f"'{name}' must be {what} from {low} to {high}, got {value!r}", param=name,
                           code="invalid_value")
    return value


def string_list_field(body, name, most):
    """body[name] as a tuple of up to `most` strings (one string or a list of them)."""
    value = body.get(name)
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not (isinstance(values, list) and len(values) <= most and all(isinstance(v, str) and v for v in values)):
        raise RequestError(f"'{name}' must be a non-empty string or a list of up to {most} of them",
                           param=name, code="invalid_value")
    return tuple(values)


def chat_messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages", code="invalid_value")
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ROLE_LABELS
                and isinstance(message.get("content"), str)):
            raise RequestError(f"messages[{index}] must have a role ({', '.join(ROLE_LABELS)}) and a "
                               "string content", param=f"messages[{index}]", code="invalid_value")
        if message["role"] == "system" and index > 0:
            raise RequestError(f"messages[{index}] is a system message; only the first message may be one",
                               param=f"messages[{index}]", code="invalid_value")
    return messages


def completion_prompt(body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be a non-empty string", param="prompt", code="invalid_value")
    return prompt


# ---------------------------------------------------------------- the server

class ModelServer:
    """One model and the lock that makes its requests take turns."""

    def __init__(self, model, tokenizer, model_name):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.context_length = model.cfg.context_length
        self.lock = asyncio.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.created = int(time.time())

    def job(self, body, chat):
        """The Job a request body asks for; RequestError for anything the server refuses."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("model") != self.model_name:
            raise RequestError(f"the model '{body.get('model')}' does not exist; this server has "
                               f"'{self.model_name}'", param="model", code="model_not_found", status=404)
        number_field(body, "n", 1, 1, 1, integer=True)  # one choice per request
        response_format = body.get("response_format") or {"type": "text"}
        if response_format != {"type": "text"}:
            raise RequestError("'response_format' other than text is not supported: the model's output "
                               "is not constrained", param="response_format", code="unsupported_value")
        if chat:
            prompt = render_chat(chat_messages(body), self.tokenizer)
            prompt_ids, stop_ids, stop_texts = prompt.token_ids, prompt.stop_ids, prompt.stop_texts
            prompt_param, default_max_tokens = "messages", self.context_length
        else:
            prompt_ids = self.tokenizer.encode(completion_prompt(body))
            stop_ids, stop_texts = (self.tokenizer.eot_id,), ()
            prompt_param, default_max_tokens = "prompt", COMPLETIONS_DEFAULT_MAX_TOKENS
        max_tokens_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = number_field(body, max_tokens_param, None, 1, self.context_length, integer=True)
        room = self.context_length - len(prompt_ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" plus max_tokens {max_tokens}" if max_tokens is not None else ""
            raise RequestError(f"the prompt's {len(prompt_ids)} tokens{asked} exceed the model's context of "
                               f"{self.context_length} tokens", param=prompt_param, code="context_length_exceeded")
        sampling = Sampling(temperature=number_field(body, "temperature", 1.0, 0, 2),
                            top_k=number_field(body, "top_k", None, 1, 2**31, integer=True),
                            top_p=number_field(body, "top_p", None, 0, 1),
                            seed=number_field(body, "seed", None, -2**63, 2**63 - 1, integer=True))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("'stream' must be true or false", param="stream", code="invalid_value")
        stream_options = body.get("stream_options") or {}
        return Job(prompt_ids, stop_ids, stop_texts + string_list_field(body, "stop", MAX_STOP_TEXTS),
                   max_tokens or min(default_max_tokens, room), sampling, stream,
                   isinstance(stream_options, dict) and stream_options.get("include_usage") is True)

    def text_stream(self, job):
        return TextStream(self.model, self.tokenizer, job.prompt_ids, job.max_tokens, job.sampling,
                          job.stop_ids, job.stop_texts)

    async def pieces(self, text_stream):
        """`text_stream`'s pieces, computed on the worker thread once this request's turn comes."""
        async with self.lock:
            loop, steps, done = asyncio.get_running_loop(), iter(text_stream), object()
            while (piece := await loop.run_in_executor(self.worker, next, steps, done)) is not done:
                yield piece

    async def respond(self, request, chat):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return RequestError(f"the request body is not valid JSON: {e}", code="invalid_json").response()
        try:
            job = self.job(body, chat)
        except RequestError as e:
            return e.response()
        reply = Reply(self, job, chat)
        if job.stream:
            return StreamingResponse(reply.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await reply.whole())


class Reply:
    """One request's response, in OpenAI's format: whole, or as server-sent event chunks."""

    def __init__(self, server, job, chat):
        self.server, self.job, self.chat = server, job, chat
        self.text_stream = server.text_stream(job)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, choices, chunk=False):
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.server.model_name,
                "choices": choices}

    def usage(self):
        prompt_tokens, completion_tokens = len(self.job.prompt_ids), self.text_stream.completion_tokens
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def choice(self, text, finish_reason):
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk(self, finish_reason=None, **delta):
        """A streamed chunk: for chat, `delta` as it is; for completions, its content as the text."""
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish_reason}
        return self.event(self.envelope([choice], chunk=True))

    async def whole(self):
        text = "".join([piece async for piece in self.server.pieces(self.text_stream)])
        return {**self.envelope([self.choice(text, self.text_stream.finish_reason)]), "usage": self.usage()}

    async def events(self):
        if self.chat:  # OpenAI's first chat chunk carries the role
            yield self.chunk(role="assistant", content="")
        async for piece in self.server.pieces(self.text_stream):
            yield self.chunk(content=piece)
        yield self.chunk(self.text_stream.finish_reason)
        if self.job.include_usage:
            yield self.event({**self.envelope([], chunk=True), "usage": self.usage()})
        yield "data: [DONE]\n\n"

    @staticmethod
    def event(data):
        return f"data: {json.dumps(data)}\n\n"


def create_app(model, tokenizer, model_name):
    server = ModelServer(model, tokenizer, model_name)
    app = FastAPI(title=f"{model_name} (OpenAI-compatible)")

    @app.exception_handler(HTTPException)
    async def http_error(request, error):  # unknown paths, wrong methods: OpenAI's error body too
        return RequestError(error.detail, status=error.status_code).response()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.respond(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.respond(request, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "ddp-gpt-trainer"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/")
    async def chat_page():
        return FileResponse(CHAT_PAGE)

    return app


@click.command(epilog=f"""{GRAMMAR}

\b
Example:
  uv run serve.py demo --port 8080
  then open http://127.0.0.1:8080/, or point an OpenAI client at http://127.0.0.1:8080/v1""")
@model_arguments
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 for every interface (anyone who reaches it may use it).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--model-name", default=None, help="The model's name in the API. Default: the run's name.")
@tokenizer_options
@threads_option
@report_user_errors
def main(model_args, host, port, model_name, tokenizer_name, datasets_dir):
    """Serve a model over an OpenAI-compatible API, with a chat page."""
    source = resolve_model(model_args)
    with listening_socket(host, port) as listening:  # before the model loads: a port in use fails fast
        model = load_model(source, pick_device())
        tokenizer = load_tokenizer(source, tokenizer_name, datasets_dir)
        app = create_app(model, tokenizer, model_name or source.name)
        uvicorn.Server(uvicorn.Config(app, host=host, port=port)).run(sockets=[listening])


def listening_socket(host, port):
    try:
        return socket.create_server((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); another server may be using "
                        "the port: pick another with --port")


if __name__ == "__main__":
    main()
