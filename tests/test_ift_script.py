"""test_ift.py: the book's collate and prompt, fine-tuning with early stopping on the
real instruction data, and the judge against a local chat-completions server."""

import copy
import email.utils
import http.server
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from click.testing import CliRunner

from evalkit import one_torch_thread  # noqa: F401  (autouse fixture)
from evalkit import (INSTRUCTION_DATA, PROJECT_DIR, assert_one_error_line, load_model, random_model, run_script,
                     save_state, tiny_config)

import test_ift
from config import load_model_config
from token_data import ByteTokenizer

P = 50256  # GPT-2 end-of-text as the pad id
# Byte-level tokens keep the tiny models fast; a 256-byte context reaches past the
# Alpaca preamble (about 140 bytes) that every example shares.
BYTES_CFG = tiny_config(context_length=256)


@pytest.fixture(scope="module")
def instruction_data():
    return json.loads(INSTRUCTION_DATA.read_text())


class Server:
    """A real HTTP server on 127.0.0.1, in a thread, answering with `reply(path, body, headers)`:
    a (status, bytes) pair, a (status, bytes, {header: value}) triple, or a function of the
    request handler that misbehaves (see `truncated` and `reset_connection`). It records
    every request and when it arrived."""

    def __init__(self, reply):
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body):
                server.requests.append({"path": self.path, "body": body, "headers": dict(self.headers),
                                        "time": time.monotonic()})
                answer = reply(self.path, body, self.headers)
                if callable(answer):
                    answer(self)
                    return
                status, payload, *headers = answer
                self.send_response(status)
                for name, value in {"Content-Length": str(len(payload)), **(headers[0] if headers else {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._answer(None)

            def do_POST(self):
                self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Answers to clients that gave up (timed out, killed) fail on purpose: no tracebacks.
        self.httpd.handle_error = lambda request, client_address: None
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def truncated(payload):
    """An answer whose Content-Length promises more than `payload`, then a closed connection."""
    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(payload) + 100))
        handler.end_headers()
        handler.wfile.write(payload)
        handler.close_connection = True
    return answer


def reset_connection(handler):
    """No answer: the connection is closed with a TCP reset (SO_LINGER 0)."""
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.connection.close()
    handler.close_connection = True


def late(seconds, answer):
    """`answer`, after `seconds`."""
    time.sleep(seconds)
    return answer


# ---------------------------------------------------------------- prompt, collate, losses

def test_prompt_is_the_books():
    with_input = {"instruction": "Rewrite the sentence.", "input": "It is hot.", "output": "Hot it is."}
    assert test_ift.format_example(with_input) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nIt is hot."
        "\n\n### Response:\nHot it is.")
    no_input = {"instruction": "Name a color.", "input": "", "output": "Red."}
    assert test_ift.format_input(no_input).endswith("### Instruction:\nName a color.")


def test_collate_pads_masks_and_crops():
    inputs, targets = test_ift.collate([[1, 2, 3], [4, 5], [6]], pad_id=P, max_length=10)
    assert inputs.tolist() == [[1, 2, 3], [4, 5, P], [6, P, P]]
    # The first end-of-text after each sequence is a target; the padding after it is not.
    assert targets.tolist() == [[2, 3, P], [5, P, -100], [P, -100, -100]]

    inputs, targets = test_ift.collate([[1, 2, 3, 4], [5]], pad_id=P, max_length=2)
    assert inputs.tolist() == [[1, 2], [5, P]]
    assert targets.tolist() == [[2, 3], [P, -100]]


def test_batches_shuffle_and_drop_only_for_training():
    encoded = [[i, i + 1] for i in range(20)]
    in_order = test_ift.make_batches(encoded, P, 64)
    assert [len(x) for x, _ in in_order] == [8, 8, 4]
    assert torch.cat([x for x, _ in in_order])[:, 0].tolist() == list(range(20))
    shuffled = test_ift.make_batches(encoded, P, 64, torch.Generator().manual_seed(0))
    firsts = torch.cat([x for x, _ in shuffled])[:, 0].tolist()
    assert [len(x) for x, _ in shuffled] == [8, 8] and len(set(firsts)) == 16 and firsts != sorted(firsts)


def test_mean_loss_is_the_mean_of_per_batch_losses_over_unmasked_targets():
    model = random_model(tiny_config(vocab_size=P + 1, emb_dim=16))
    batches = [test_ift.collate([[1, 2, 3], [4]], P, 64), test_ift.collate([[7, 8]], P, 64)]
    expected = []
    with torch.no_grad():
        for inputs, targets in batches:
            log_probs = torch.log_softmax(model(inputs).double(), dim=-1)
            picked = [-float(log_probs[r, t, targets[r, t]]) for r in range(targets.shape[0])
                      for t in range(targets.shape[1]) if targets[r, t] != -100]
            expected.append(sum(picked) / len(picked))
    assert test_ift.mean_loss(model, batches) == pytest.approx(sum(expected) / 2, abs=1e-5)


# ---------------------------------------------------------------- fine-tuning

def tiny_fine_tune_setup(instruction_data, lr):
    tokenizer = ByteTokenizer()
    train, _, validation = test_ift.split_data(instruction_data[:30])
    encoded_train = [tokenizer.encode(test_ift.format_example(e)) for e in train]
    val_batches = test_ift.make_batches([tokenizer.encode(test_ift.format_example(e)) for e in validation],
                                        tokenizer.eot_id, BYTES_CFG["context_length"])
    model = random_model({**BYTES_CFG, "drop_rate": 0.0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    return model, optimizer, encoded_train, val_batches, tokenizer.eot_id


def test_early_stopping_restores_the_previous_epochs_weights(instruction_data):
    # A learning rate far above the book's makes the validation loss really rise
    # after a few epochs on 25 training items.
    model, optimizer, train, val_batches, pad_id = tiny_fine_tune_setup(instruction_data, lr=0.03)
    snapshots = {}
    history, kept = test_ift.fine_tune(
        model, optimizer, train, val_batches, pad_id, epochs=None,
        generator=torch.Generator().manual_seed(42),
        on_epoch_end=lambda epoch, m: snapshots.update({epoch: copy.deepcopy(m.state_dict())}))

    last = len(history)
    assert 2 <= last < test_ift.MAX_EPOCHS and kept == last - 1
    assert history[-1]["val_loss"] >= history[-2]["val_loss"]
    assert all(a["val_loss"] > b["val_loss"] for a, b in zip(history[:-2], history[1:-1]))
    restored = model.state_dict()
    assert all(torch.equal(restored[k], snapshots[kept][k]) for k in restored)
    assert not all(torch.equal(restored[k], snapshots[last][k]) for k in restored)
    assert test_ift.mean_loss(model, val_batches) == pytest.approx(history[-2]["val_loss"], abs=1e-6)


def test_fixed_epochs_train_exactly_that_many_even_when_validation_rises(instruction_data):
    model, optimizer, train, val_batches, pad_id = tiny_fine_tune_setup(instruction_data, lr=0.03)
    start = copy.deepcopy(model.state_dict())
    snapshots = {}
    history, kept = test_ift.fine_tune(
        model, optimizer, train, val_batches, pad_id, epochs=14,
        generator=torch.Generator().manual_seed(42),
        on_epoch_end=lambda epoch, m: snapshots.update({epoch: copy.deepcopy(m.state_dict())}))
    assert [h["epoch"] for h in history] == list(range(1, 15)) and kept == 14
    # The same run as above, so the validation loss rose somewhere on the way.
    assert any(b["val_loss"] >= a["val_loss"] for a, b in zip(history, history[1:]))
    final = model.state_dict()
    assert all(torch.equal(final[k], snapshots[14][k]) for k in final)
    assert not torch.equal(final["tok_emb.weight"], start["tok_emb.weight"])


def test_dropout_option_sets_the_rate_fine_tuning_trains_with(tmp_path, instruction_data):
    cfg = tiny_config(drop_rate=0.2)  # a 64-byte context: a quick two-batch epoch on 20 items
    model_json, weights = tmp_path / "model.json", tmp_path / "model.safetensors"
    model_json.write_text(json.dumps(cfg))
    save_state(random_model(cfg).state_dict(), weights)
    tokenizer = ByteTokenizer()
    train, _, validation = test_ift.split_data(instruction_data[:20])
    encoded_train = [tokenizer.encode(test_ift.format_example(e)) for e in train]
    val_batches = test_ift.make_batches([tokenizer.encode(test_ift.format_example(e)) for e in validation],
                                        tokenizer.eot_id, cfg["context_length"])

    def fine_tuned(dropout, global_seed):
        """One epoch from the same weights and batch order; only the global RNG
        (which draws the dropout masks) varies with `global_seed`."""
        drop_rate = test_ift.fine_tuning_drop_rate(dropout, load_model_config(model_json))
        model = load_model(model_json, weights, "cpu", drop_rate)
        rates = ({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
                 | {block.att.drop_rate for block in model.trf_blocks})
        torch.manual_seed(global_seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        history, _ = test_ift.fine_tune(model, optimizer, encoded_train, val_batches, tokenizer.eot_id,
                                        epochs=1, generator=torch.Generator().manual_seed(42))
        return rates, history[0]["train_loss"]

    model_0, off_0 = fine_tuned("model", 0), fine_tuned("off", 0)
    # "model" is model.json's rate, "on" GPT-2's, "off" none, in every dropout layer.
    assert model_0[0] == {0.2} and fine_tuned("on", 0)[0] == {0.1} and off_0[0] == {0.0}
    # With dropout the masks (from the global RNG) change the training; without it
    # the global RNG plays no part.
    assert fine_tuned("model", 0) == model_0
    assert fine_tuned("model", 1)[1] != model_0[1] != off_0[1]
    assert fine_tuned("off", 1) == off_0


def write_run(tmp_path, instruction_data):
    """A tiny run directory whose train.json names a byte-level dataset, so the
    script picks the bytes tokenizer by itself."""
    dataset_dir = tmp_path / "datasets" / "bytes"
    dataset_dir.mkdir(parents=True)
    (dataset_dir / "meta.json").write_text(json.dumps({"tokenizer": "bytes", "vocab_size": 257, "eot_id": 256}))
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "train.json").write_text(json.dumps({"dataset": str(dataset_dir), "microbatch_size": 2}))
    (run_dir / "model.json").write_text(json.dumps(BYTES_CFG))
    save_state(random_model(BYTES_CFG).state_dict(), run_dir / "model.safetensors")
    return run_dir


def test_generate_downloads_data_once_trains_fixed_epochs_and_writes_results(tmp_path, instruction_data):
    items = instruction_data[:30]
    payload = json.dumps(items).encode()
    with Server(lambda path, body, headers: (200, payload)) as server:
        url = f"{server.url}/ch07/instruction-data.json"
        run_dir = write_run(tmp_path, instruction_data)
        result = CliRunner().invoke(test_ift.cli, [
            "generate", "tiny", str(run_dir / "model.json"), str(run_dir / "model.safetensors"),
            "--data", url, "--cache-dir", str(tmp_path / "cache"), "--epochs", "2",
            "--out-dir", str(tmp_path / "out")])
        assert result.exit_code == 0, result.output + result.stderr
        # The second use of the URL reads the cache.
        assert test_ift.load_instruction_data(url, tmp_path / "cache") == items
        assert len(server.requests) == 1

    assert "tokenizer: bytes" in result.stderr
    assert re.findall(r"^epoch (\d+): train loss [\d.]+, validation loss [\d.]+$", result.stdout, re.M) == ["1", "2"]
    results = json.loads((tmp_path / "out" / "tiny-ift-test-results.json").read_text())
    # 30 items: 25 train, 3 test, 2 validation, in file order.
    assert results["split_sizes"] == {"train": 25, "test": 3, "validation": 2}
    assert [h["epoch"] for h in results["epochs"]] == [1, 2] and results["kept_epoch"] == 2
    # By default fine-tuning keeps model.json's dropout, as the reference harness does.
    assert results["dropout"] == "model" and results["drop_rate"] == BYTES_CFG["drop_rate"]
    assert results["test_loss"] > 0
    assert [{k: i[k] for k in ("instruction", "input", "output")} for i in results["items"]] == items[25:28]
    assert all(isinstance(i["model_response"], str) for i in results["items"])


@pytest.mark.e2e
def test_bad_instruction_data_is_one_error_line(tmp_path):
    bad = tmp_path / "data.json"
    bad.write_text(json.dumps([{"instruction": "Say hi.", "output": 3}]))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    result = run_script("test_ift.py", "generate", "x", model_dir / "model.json",
                        model_dir / "model.safetensors", "--data", bad)
    assert_one_error_line(result, "item 0 needs string fields")


# ---------------------------------------------------------------- the judge

def results_file(path, items, prefix):
    path.write_text(json.dumps({"name": prefix, "items": [
        {**item, "model_response": f"{prefix} answer {i}"} for i, item in enumerate(items)]}))
    return path


def chat_reply(content):
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


def test_judge_shuffles_retries_reports_and_ranks(tmp_path, instruction_data):
    items = instruction_data[:3]
    alpha = results_file(tmp_path / "alpha-ift-test-results.json", items, "alpha")
    beta = results_file(tmp_path / "beta-ift-test-results.json", items, "beta")
    valid_replies = {}  # instruction -> how many valid judgements given so far
    orders = []

    def reply(path, body, headers):
        prompt = body["messages"][0]["content"]
        item = next(i for i, entry in enumerate(items) if entry["instruction"] in prompt)
        calls = [r for r in server.requests if items[item]["instruction"] in r["body"]["messages"][0]["content"]]
        if len(server.requests) == 1:
            return 503, b"busy"  # transient: retried after a pause
        if item == 1 and len(calls) == 1:
            return chat_reply("Scores: Model 1 is fine")  # malformed once, then fine
        if item == 2:
            return chat_reply('{"Model 1": {"score": 150}, "Model 2": {"score": 20}}')  # always out of range
        # Model j's response names its file; alpha scores 80, beta 30, +10 on the second repeat.
        shown = re.findall(r"# Model (\d)\n\n```\n(\w+) answer", prompt)
        orders.append([name for _, name in shown])
        bump = 10 * valid_replies.get(item, 0)
        valid_replies[item] = valid_replies.get(item, 0) + 1
        verdict = {f"Model {j}": {"score": (80 if name == "alpha" else 30) + bump, "comment": f"{name} ok"}
                   for j, name in shown}
        return chat_reply("```json\n" + json.dumps(verdict) + "\n```")

    with Server(reply) as server:
        result = CliRunner().invoke(test_ift.cli, [
            "judge", str(alpha), str(beta), "--base-url", f"{server.url}/v1", "--api-key", "test-key",
            "--judge-model", "judge-1", "--repeats", "2", "--seed", "3"])
        requests = server.requests

    assert result.exit_code == 0, result.output + result.stderr
    assert {r["path"] for r in requests} == {"/v1/chat/completions"}
    assert {r["headers"]["Authorization"] for r in requests} == {"Bearer test-key"}
    assert {r["body"]["model"] for r in requests} == {"judge-1"}
    # Repeat 1: item 0 503 then fine, item 1 malformed then fine, item 2 three malformed
    # attempts; repeat 2: one each for items 0 and 1, three for item 2.
    assert len(requests) == 2 + 2 + 3 + 1 + 1 + 3
    assert len({tuple(order) for order in orders}) == 2  # the models were shown in both orders

    # Item 2 never got a usable judgement: reported, not counted.
    assert result.stderr.count("not judged") == 2 and "item 2" in result.stderr
    rows = re.findall(r"^\s+(\d)\s+([\d.]+)\s+([\d.]+)\s+(\d+)/(\d+)\s+(\S+)$", result.stdout, re.M)
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        ("1", "85.00", "7.07", "4", "6"), ("2", "35.00", "7.07", "4", "6")]
    assert rows[0][5].endswith("alpha-ift-test-results.json")

    judged = json.loads((tmp_path / "alpha-ift-test-results-judged.json").read_text())
    assert [i["judge_scores"] for i in judged["items"]] == [[80.0, 90.0], [80.0, 90.0], [None, None]]
    assert judged["items"][0]["judge_comments"] == ["alpha ok", "alpha ok"]
    assert judged["judge"]["mean"] == pytest.approx(85.0)
    assert [f["item"] for f in judged["judge"]["failures"]] == [2, 2]
    assert "score must be a number from 0 to 100, got 150" in judged["judge"]["failures"][0]["error"]


def test_judge_refuses_mismatched_files_and_http_errors(tmp_path, instruction_data):
    alpha = results_file(tmp_path / "a.json", instruction_data[:3], "alpha")
    other = results_file(tmp_path / "b.json", instruction_data[1:4], "beta")
    result = CliRunner().invoke(test_ift.cli, ["judge", str(alpha), str(other), "--base-url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "same items in the same order" in result.stderr

    with Server(lambda path, body, headers: (401, b'{"error": "bad key"}')) as server:
        result = CliRunner().invoke(test_ift.cli, ["judge", str(alpha), "--base-url", server.url])
    assert result.exit_code == 2 and "answered HTTP 401" in result.stderr and len(server.requests) == 1


@pytest.mark.e2e
def test_malformed_results_file_is_one_error_line(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"items": [')
    assert_one_error_line(run_script("test_ift.py", "judge", broken), "broken.json: malformed JSON")


def item_of(prompt, items):
    return next(i for i, entry in enumerate(items) if entry["instruction"] in prompt)


def judgement(prompt, score):
    """A judge's reply giving every model shown in `prompt` the same `score`."""
    shown = re.findall(r"^# Model (\d+)$", prompt, re.M)
    return chat_reply(json.dumps({f"Model {j}": {"score": score, "comment": "ok"} for j in shown}))


def judge_args(server, *paths, retries=3):
    """A judge command line with test-sized waits: a 0.01 s back-off cap, a 1 s time-out."""
    return ["judge", *map(str, paths), "--base-url", server.url, "--retries", str(retries),
            "--max-backoff", "0.01", "--timeout", "1", "--seed", "5"]


def test_string_scores_are_accepted_and_the_prompt_shows_numbers():
    assert test_ift.parse_judgement('{"Model 1": {"score": "72", "comment": "fine"}, '
                                    '"Model 2": {"score": " 40.5 "}}', 2) == [(72.0, "fine"), (40.5, "")]
    with pytest.raises(ValueError, match='Model 1: score must be a number from 0 to 100, got "high"'):
        test_ift.parse_judgement('{"Model 1": {"score": "high"}}', 1)
    prompt = test_ift.judge_prompt({"instruction": "Say hi.", "input": "", "output": "Hi."}, ["a", "b"])
    example = json.loads(prompt[prompt.index("{"):prompt.index("}\n}") + 3])
    assert [type(answer["score"]) for answer in example.values()] == [int, int]


def test_retry_after_and_backoff():
    assert test_ift.retry_after_seconds("1") == 1.0 and test_ift.retry_after_seconds(None) is None
    assert test_ift.retry_after_seconds("soon") is None
    in_30_s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < test_ift.retry_after_seconds(in_30_s) <= 30
    delays = [test_ift.backoff_delay(retry, max_backoff=4) for retry in range(6) for _ in range(20)]
    assert all(0.5 <= d <= 4 for d in delays) and max(delays[:20]) <= 1 and min(delays[-20:]) >= 2
    assert len(set(delays[:20])) > 1  # jittered
    assert test_ift.backoff_delay(0, max_backoff=0.01, retry_after=1.0) == 1.0


def test_judge_retries_every_kind_of_transient_failure(tmp_path, instruction_data):
    items = instruction_data[:3]
    alpha = results_file(tmp_path / "alpha-ift-test-results.json", items, "alpha")
    # Per item, the answers to its successive requests; the last one is the judgement,
    # its score a string as judges often give it.
    misbehaviour = {0: [lambda prompt: truncated(judgement(prompt, "72")[1])],
                    1: [lambda prompt: reset_connection,
                        lambda prompt: (429, b'{"error": "slow down"}', {"Retry-After": "1"})],
                    2: [lambda prompt: (500, b"oops"), lambda prompt: (502, b"bad gateway"),
                        lambda prompt: late(1.5, judgement(prompt, 72))]}  # past the 1 s time-out

    def reply(path, body, headers):
        prompt = body["messages"][0]["content"]
        item = item_of(prompt, items)
        calls = sum(item_of(r["body"]["messages"][0]["content"], items) == item for r in server.requests)
        answers = misbehaviour[item]
        return answers[calls - 1](prompt) if calls <= len(answers) else judgement(prompt, "72")

    with Server(reply) as server:
        result = CliRunner().invoke(test_ift.cli, judge_args(server, alpha))
        requests = server.requests

    assert result.exit_code == 0, result.output + result.stderr
    per_item = [[r for r in requests if item_of(r["body"]["messages"][0]["content"], items) == item]
                for item in range(3)]
    assert [len(r) for r in per_item] == [2, 3, 4]
    # The 429's Retry-After: 1 outweighs the 0.01 s back-off cap.
    assert per_item[1][2]["time"] - per_item[1][1]["time"] >= 1.0
    for problem in ("IncompleteRead", "HTTP 429", "HTTP 500", "HTTP 502", "timed out"):
        assert problem in result.stderr
    assert "Traceback" not in result.stderr and "not judged" not in result.stderr
    judged = json.loads((tmp_path / "alpha-ift-test-results-judged.json").read_text())
    assert [i["judge_scores"] for i in judged["items"]] == [[72.0]] * 3
    assert judged["judge"]["failures"] == []
    # JSON output, greedy decoding and a fixed seed are asked for.
    assert all(r["body"]["response_format"] == {"type": "json_object"} and r["body"]["temperature"] == 0
               and r["body"]["seed"] == 5 for r in requests)


def test_a_server_rejecting_response_format_is_asked_without_it(tmp_path, instruction_data):
    alpha = results_file(tmp_path / "alpha.json", instruction_data[:2], "alpha")

    def reply(path, body, headers):
        if "response_format" in body:
            return 400, b'{"error": {"message": "response_format is not supported by this server"}}'
        return judgement(body["messages"][0]["content"], 60)

    with Server(reply) as server:
        result = CliRunner().invoke(test_ift.cli, judge_args(server, alpha))
        requests = server.requests
    assert result.exit_code == 0, result.output + result.stderr
    # Asked once with it, then without it for the rest of the run.
    assert ["response_format" in r["body"] for r in requests] == [True, False, False]
    assert result.stderr.count("rejects 'response_format'") == 1
    assert json.loads((tmp_path / "alpha-judged.json").read_text())["judge"]["mean"] == 60.0


def test_an_item_failing_every_retry_is_recorded_and_a_rerun_judges_only_it(tmp_path, instruction_data):
    items = instruction_data[:3]
    alpha = results_file(tmp_path / "alpha-ift-test-results.json", items, "alpha")
    beta = results_file(tmp_path / "beta-ift-test-results.json", items, "beta")
    judged_alpha = tmp_path / "alpha-ift-test-results-judged.json"

    def flaky(path, body, headers):
        prompt = body["messages"][0]["content"]
        return (503, b"overloaded") if item_of(prompt, items) == 1 else judgement(prompt, 40)

    with Server(flaky) as server:
        first = CliRunner().invoke(test_ift.cli, judge_args(server, alpha, beta, retries=2))
        first_requests = len(server.requests)
    assert first.exit_code == 0, first.output + first.stderr
    assert first_requests == 1 + 3 + 1  # item 1: the first try and 2 retries
    assert "1 judgement(s) failed" in first.stdout and "rerun the same command" in first.stdout
    saved = json.loads(judged_alpha.read_text())
    assert [i["judge_scores"] for i in saved["items"]] == [[40.0], [None], [40.0]]
    [failure] = saved["judge"]["failures"]
    assert failure["item"] == 1 and "failed 3 times; last: HTTP 503" in failure["error"]

    with Server(lambda path, body, headers: judgement(body["messages"][0]["content"], 90)) as server:
        rerun = CliRunner().invoke(test_ift.cli, judge_args(server, alpha, beta, retries=2))
        rerun_requests = server.requests
    assert rerun.exit_code == 0, rerun.output + rerun.stderr
    assert [item_of(r["body"]["messages"][0]["content"], items) for r in rerun_requests] == [1]
    assert "continuing: 2 of 3 judgements" in rerun.stderr and "failed" not in rerun.stdout
    for judged_file in (judged_alpha, tmp_path / "beta-ift-test-results-judged.json"):
        done = json.loads(judged_file.read_text())
        assert [i["judge_scores"] for i in done["items"]] == [[40.0], [90.0], [40.0]]
        assert done["judge"]["failures"] == []


@pytest.mark.e2e
def test_a_killed_run_keeps_its_judgements_and_a_rerun_judges_only_the_rest(tmp_path, instruction_data):
    items = instruction_data[:4]
    alpha = results_file(tmp_path / "alpha-ift-test-results.json", items, "alpha")
    beta = results_file(tmp_path / "beta-ift-test-results.json", items, "beta")
    held = threading.Event()

    def reply(path, body, headers):
        if len(server.requests) == 3:
            held.wait(120)  # the third judgement never comes: the client is killed meanwhile
        return judgement(body["messages"][0]["content"], 55)

    with Server(reply) as server:
        process = subprocess.Popen([sys.executable, "test_ift.py", *judge_args(server, alpha, beta)],
                                   cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while len(server.requests) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.kill()
        process.wait()
        held.set()
        assert len(server.requests) == 3
        saved = json.loads((tmp_path / "alpha-ift-test-results-judged.json").read_text())
        assert [i["judge_scores"] for i in saved["items"]] == [[55.0], [55.0], [None], [None]]

        server.requests.clear()
        rerun = CliRunner().invoke(test_ift.cli, judge_args(server, alpha, beta))
        rerun_prompts = [r["body"]["messages"][0]["content"] for r in server.requests]
        server.requests.clear()
        restart = CliRunner().invoke(test_ift.cli, [*judge_args(server, alpha, beta), "--restart"])
        restart_prompts = [r["body"]["messages"][0]["content"] for r in server.requests]

    assert rerun.exit_code == 0, rerun.output + rerun.stderr
    assert [item_of(prompt, items) for prompt in rerun_prompts] == [2, 3]
    # The rerun shows the models in the order an uninterrupted run does.
    assert restart.exit_code == 0 and rerun_prompts == restart_prompts[2:]
    done = json.loads((tmp_path / "beta-ift-test-results-judged.json").read_text())
    assert [i["judge_scores"] for i in done["items"]] == [[55.0]] * 4


def test_an_endpoint_down_for_several_items_stops_the_run_keeping_what_was_judged(tmp_path, instruction_data):
    items = instruction_data[:6]
    alpha = results_file(tmp_path / "alpha.json", items, "alpha")

    def reply(path, body, headers):
        prompt = body["messages"][0]["content"]
        return judgement(prompt, 30) if item_of(prompt, items) == 0 else (503, b"down")

    with Server(reply) as server:
        result = CliRunner().invoke(test_ift.cli, judge_args(server, alpha, retries=1))
        requests = len(server.requests)
    # Item 0 judged; items 1-3 fail every retry; items 4 and 5 are not tried.
    assert result.exit_code == 2 and requests == 1 + 3 * 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: the judge endpoint failed on 3 items in a row (last: ")
    assert "rerun the same command to continue" in result.stderr
    saved = json.loads((tmp_path / "alpha-judged.json").read_text())
    assert [i["judge_scores"] for i in saved["items"]] == [[30.0]] + [[None]] * 5
    assert [f["item"] for f in saved["judge"]["failures"]] == [1, 2, 3]
