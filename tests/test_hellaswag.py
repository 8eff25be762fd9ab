"""eval_hellaswag.py and hellaswag_scoring.py: scores against transformers' GPT-2 scored by hand, the
download cache, bad input, batching; and the evaluation scripts' --threads."""

import http.server
import json
import threading

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from evalkit import one_torch_thread  # noqa: F401  (autouse fixture)
from evalkit import ITEMS, assert_one_error_line, load_model, run_script, tiny_config, write_items, write_model

import hellaswag_scoring
from token_data import get_tokenizer

# GPT-2-tokenized, with a context short enough that the third item is cut.
GPT2_CFG = tiny_config(vocab_size=50257, context_length=48, emb_dim=32)
BYTES_CFG = tiny_config(context_length=64)  # byte-level: most items are cut


def run_eval(model_json, weights, *args):
    return run_script("eval_hellaswag.py", model_json, weights, *args)


def transformers_scores(hf_dir, items, context_length):
    """(sum of log-probabilities, mean cross-entropy) per ending per item, from
    transformers' model and tokenizer, one ending at a time."""
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    sums, means = [], []
    with torch.no_grad():
        for item in items:
            ctx = tokenizer(item["ctx"]).input_ids
            sums.append([]), means.append([])
            for ending in item["endings"]:
                ending_ids = tokenizer(" " + ending).input_ids
                ids = (ctx + ending_ids)[-(context_length + 1):]  # the rightmost tokens that fit
                scored = min(len(ending_ids), len(ids) - 1)
                log_probs = torch.log_softmax(hf(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
                target_log_probs = log_probs.gather(1, torch.tensor(ids[1:])[:, None])[-scored:, 0]
                sums[-1].append(target_log_probs.sum().item())
                means[-1].append(-target_log_probs.mean().item())
    return sums, means


def our_scores(model_json, weights, tokenizer_name, items, batch_size):
    model = load_model(model_json, weights, "cpu")
    tokenizer = get_tokenizer(tokenizer_name)
    encoded = [hellaswag_scoring.encode_item(hellaswag_scoring.Item(item["ctx"], tuple(item["endings"]), item["label"]),
                                          tokenizer, model.cfg.context_length) for item in items]
    return hellaswag_scoring.score_items(model, encoded, batch_size)


def test_scores_match_transformers_gpt2_scored_by_hand(tmp_path):
    model_json, weights, _ = write_model(tmp_path / "model", GPT2_CFG)
    converted = run_script("convert_gpt2.py", "to-hf", model_json, weights, tmp_path / "hf", "--tokenizer", "gpt2")
    assert converted.returncode == 0, converted.stderr
    sums, means = transformers_scores(tmp_path / "hf", ITEMS, GPT2_CFG["context_length"])

    ours = our_scores(model_json, weights, "gpt2", ITEMS, batch_size=3)
    torch.testing.assert_close([s.sum_logprobs for s in ours], sums, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close([s.mean_losses for s in ours], means, rtol=1e-4, atol=1e-4)
    choices = [max(range(4), key=row.__getitem__) for row in sums]
    choices_norm = [min(range(4), key=row.__getitem__) for row in means]
    assert [s.choice for s in ours] == choices
    assert [s.choice_norm for s in ours] == choices_norm

    result = run_eval(model_json, weights, "--data", write_items(tmp_path / "val.jsonl"), "--tokenizer", "gpt2",
                      "--json", tmp_path / "out.json")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "out.json").read_text())
    labels = [item["label"] for item in ITEMS]
    correct = sum(c == label for c, label in zip(choices, labels))
    correct_norm = sum(c == label for c, label in zip(choices_norm, labels))
    assert (written["correct"], written["correct_norm"], written["items"]) == (correct, correct_norm, len(ITEMS))
    assert written["acc"] == correct / len(ITEMS) and written["acc_norm"] == correct_norm / len(ITEMS)
    assert written["truncated_items"] == 1 and written["tokenizer"] == "gpt2"
    assert f"acc_norm {correct_norm / len(ITEMS):.4f} ({correct_norm}/{len(ITEMS)})" in result.stdout


@pytest.fixture(scope="module")
def bytes_model(tmp_path_factory):
    model_json, weights, _ = write_model(tmp_path_factory.mktemp("bytes-model"), BYTES_CFG)
    return model_json, weights


def test_limit_and_batch_size_do_not_change_the_result(tmp_path, bytes_model):
    data = write_items(tmp_path / "val.jsonl")
    counts = []
    for batch_size in (1, 4):
        out = tmp_path / f"batch-{batch_size}.json"
        result = run_eval(*bytes_model, "--data", data, "--tokenizer", "bytes", "--limit", 5,
                          "--batch-size", batch_size, "--json", out)
        assert result.returncode == 0, result.stderr
        written = json.loads(out.read_text())
        counts.append((written["correct"], written["correct_norm"], written["items"], written["acc_norm"]))
    assert counts[0] == counts[1] and counts[0][2] == 5

    one_by_one, batched = (our_scores(*bytes_model, "bytes", ITEMS, batch_size) for batch_size in (1, 4))
    torch.testing.assert_close([s.sum_logprobs for s in batched], [s.sum_logprobs for s in one_by_one])
    torch.testing.assert_close([s.mean_losses for s in batched], [s.mean_losses for s in one_by_one])
    assert hellaswag_scoring.tally(batched) == hellaswag_scoring.tally(one_by_one)
    assert hellaswag_scoring.tally(batched[:5]) == counts[0][:3]


class HellaSwagServer:
    """A local HTTP server: /hellaswag_val.jsonl is the data; /missing.jsonl is a 404;
    /short.jsonl closes the connection before its Content-Length; /page.jsonl is an HTML page."""

    def __init__(self, body):
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path == "/missing.jsonl":
                    self.send_error(404)
                    return
                payload = b"<html>Not here</html>" if self.path == "/page.jsonl" else body
                declared = len(payload) + (1000 if self.path == "/short.jsonl" else 0)
                self.send_response(200)
                self.send_header("Content-Length", str(declared))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    server = HellaSwagServer(write_items(tmp_path / "served.jsonl").read_bytes())
    yield server
    server.close()


def test_download_is_cached_once(tmp_path, server, bytes_model):
    cache = tmp_path / "cache"
    url = f"{server.url}/hellaswag_val.jsonl"
    runs = [run_eval(*bytes_model, "--data", url, "--cache-dir", cache, "--tokenizer", "bytes") for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert server.requests == ["/hellaswag_val.jsonl"]
    assert runs[0].stdout == runs[1].stdout and f"HellaSwag: {len(ITEMS)} items" in runs[0].stdout
    [cached] = cache.iterdir()
    assert cached.name.endswith("-hellaswag_val.jsonl")
    assert cached.read_bytes() == (tmp_path / "served.jsonl").read_bytes()


@pytest.mark.parametrize("path, message", [("/missing.jsonl", "HTTP Error 404"),
                                           ("/short.jsonl", "the connection closed after"),
                                           ("/page.jsonl", "line 1: malformed JSON")])
def test_failed_download_caches_nothing(tmp_path, server, bytes_model, path, message):
    cache = tmp_path / "cache"
    result = run_eval(*bytes_model, "--data", server.url + path, "--cache-dir", cache)
    # stderr also holds the download's progress bar: the error is its last line, with no traceback.
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and server.url + path in last_line and message in last_line, last_line
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "A man sits.", "endings": ["a", "b", "c", "d"], "label": 1', "malformed JSON"),
    ('{"ctx": "A man sits.", "endings": ["a", "b", "c"], "label": 1}', "'endings' must be a list of 4 strings"),
    ('{"ctx": "A man sits.", "endings": ["a", "b", "c", "d"], "label": 4}', "'label' must be an integer from 0 to 3"),
    ('{"ctx": "A man sits.", "endings": ["a", "b", "c", "d"]}', "got null"),
])
def test_bad_item_is_one_error_line_naming_file_and_line(tmp_path, bytes_model, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ITEMS[0]) + "\n" + line + "\n")
    result = run_eval(*bytes_model, "--data", data)
    assert_one_error_line(result, f"{data} line 2:", message)


def test_missing_data_file_is_one_error_line(tmp_path, bytes_model):
    result = run_eval(*bytes_model, "--data", tmp_path / "nothing.jsonl")
    assert_one_error_line(result, str(tmp_path / "nothing.jsonl"), "not found")


@pytest.mark.parametrize("script, args", [
    ("eval_hellaswag.py", ["missing/model.json", "missing.safetensors", "--data", "missing.jsonl"]),
    ("test_smoke.py", ["missing/model.json", "missing.safetensors"]),
    ("test_loss.py", ["datasets", "missing/model.json", "missing.safetensors"]),
    ("test_ift.py", ["generate", "name", "missing/model.json", "missing.safetensors", "--data", "missing.json"]),
])
def test_threads_option_sets_torchs_thread_count(script, args):
    assert torch.get_num_threads() == 1  # one_torch_thread's
    result = run_script(script, *args, "--threads", 3)
    assert_one_error_line(result, "missing")
    assert torch.get_num_threads() == 3
