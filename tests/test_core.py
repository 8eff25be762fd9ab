"""eval_core.py / core_scoring.py: CORE on small tasks of all three types, written in the
eval bundle's format, against transformers' GPT-2 on converted weights with the prompts
(Jinja templates, as nanochat renders them) and the scoring written out here; the
standard errors against hand arithmetic; the bundle's download, cache and zip; bad input;
the rank shares of in-training CORE."""

import http.server
import json
import math
import random
import threading
import zipfile

from types import SimpleNamespace

import jinja2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, GPT2LMHeadModel

from conftest import make_run, read_rows, run_training, tokens_for
from evalkit import SHARED_DIR, assert_one_error_line, run_script, tiny_config, write_model
from evalkit import one_torch_thread  # noqa: F401  (autouse fixture)

import charts
import core_scoring
from config import TrainConfig
from errors import UserError
from model_source import from_model_json, load_model
from token_data import get_tokenizer

VERDICT = (SHARED_DIR / "data" / "the-verdict.txt").read_text(encoding="utf-8")
GPT2_CFG = tiny_config(vocab_size=50257, context_length=64, drop_rate=0.0)
BYTES_CFG = tiny_config(context_length=96, drop_rate=0.0)
ITEMS_PER_TASK = 12

CORE_YAML = """\
icl_tasks:
- label: mc_test
  dataset_uri: test/mc.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer:"
  has_categories: false
- label: schema_test
  dataset_uri: test/schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
- label: lm_test
  dataset_uri: test/lm.jsonl
  num_fewshot: [3]
  icl_task_type: language_modeling
"""
META_CSV = "Eval Task,Task Category,Random baseline\nmc_test,test,25\nschema_test,test,50\nlm_test,test,0\n"
BASELINES = {"mc_test": 25.0, "schema_test": 50.0, "lm_test": 0.0}


# ---------------------------------------------------------------- the test tasks, from a real text

def words_of(text):
    return text.split()


def choice_items():
    """multiple_choice and schema items cut from the-verdict.txt, with a seeded random generator."""
    rng = random.Random(0)
    words = words_of(VERDICT)
    mc, schema = [], []
    for _ in range(ITEMS_PER_TASK):
        at = rng.randrange(8, len(words) - 8)
        answers = [" ".join(words[at:at + 3])] + [" " + " ".join(words[s:s + rng.randint(1, 4)])
                                                  for s in rng.sample(range(len(words) - 4), 3)]
        gold = rng.randrange(4)
        answers[0] = " " + answers[0]
        answers.insert(gold, answers.pop(0))
        mc.append({"query": "Text: " + " ".join(words[at - 8:at]), "choices": answers, "gold": gold})
        other = rng.randrange(8, len(words) - 8)
        options = [" ".join(words[at - 6:at]), " ".join(words[other - 6:other])]
        schema_gold = rng.randrange(2)
        schema.append({"context_options": options if schema_gold == 0 else options[::-1],
                       "continuation": " ".join(words[at:at + 4]), "gold": schema_gold})
    return {"mc_test": mc, "schema_test": schema}


def lm_contexts():
    """language_modeling contexts: word-aligned passages of the-verdict.txt ending in a letter."""
    rng = random.Random(1)
    words = words_of(VERDICT)
    contexts = []
    while len(contexts) < ITEMS_PER_TASK:
        at = rng.randrange(8, len(words))
        if words[at - 1][-1].isalpha():
            contexts.append(" ".join(words[at - rng.randint(3, 8):at]))
    return contexts


def lm_items(hf, hf_tokenizer):
    """language_modeling items that a random model gets partly right: every item's continuation is
    one word, the same for all (so the few-shot examples do not depend on it), picked among the
    words the model predicts next so that some items are right and some wrong."""
    contexts = lm_contexts()
    with torch.no_grad():
        top = [hf(torch.tensor([hf_tokenizer.encode(c)])).logits[0, -1].topk(5).indices.tolist() for c in contexts]
    words = [hf_tokenizer.decode([t]) for tokens in top for t in tokens]
    for word in dict.fromkeys(w[1:] for w in words if w.startswith(" ") and w[1:].isalpha()):
        items = [{"context": c, "continuation": word} for c in contexts]
        correct = [c for c, _ in reference_scores(hf, hf_tokenizer.encode, hf_tokenizer.bos_token_id,
                                                   GPT2_CFG["context_length"], "lm_test", shuffled(items))]
        if 0 < sum(correct) < len(correct):
            return items
    raise AssertionError("no continuation that the model gets partly right")
URIS = {"mc_test": "test/mc.jsonl", "schema_test": "test/schema.jsonl", "lm_test": "test/lm.jsonl"}


def write_bundle(root, items):
    """The eval bundle's layout: root/eval_bundle/{core.yaml, eval_meta_data.csv, eval_data/...}."""
    bundle = root / "eval_bundle"
    (bundle / "eval_data" / "test").mkdir(parents=True)
    (bundle / "core.yaml").write_text(CORE_YAML)
    (bundle / "eval_meta_data.csv").write_text(META_CSV)
    for label, uri in URIS.items():
        (bundle / "eval_data" / uri).write_text("".join(json.dumps(item) + "\n" for item in items[label]))
    return bundle


def zip_bundle(bundle, path):
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(bundle.rglob("*")):
            archive.write(file, file.relative_to(bundle.parent))
    return path


# ---------------------------------------------------------------- the reference, written out plainly

SHOTS = {"mc_test": 2, "schema_test": 1, "lm_test": 3}
DELIMITERS = {"mc_test": "\nAnswer:", "schema_test": " ", "lm_test": " "}
# nanochat renders its prompts with Jinja; these templates say the same in this test's words.
TEMPLATES = {
    "mc_test": "{% for x in shots %}{{ x.query }}{{ d }}{{ x.choices[x.gold] }}\n\n{% endfor %}"
               "{{ item.query }}{{ d }}{{ option }}",
    "schema_test": "{% for x in shots %}{{ x.context_options[x.gold] }}{{ d }}{{ x.continuation }}\n\n{% endfor %}"
                   "{{ option }}{{ d }}{{ item.continuation }}",
    "lm_test": "{% for x in shots %}{{ x.context | trim }}{{ d }}{{ x.continuation }}\n\n{% endfor %}"
               "{{ item.context | trim }}{{ d }}{% if with_answer %}{{ item.continuation }}{% endif %}",
}


def reference_prompts(label, data, i):
    rng = random.Random(1234 + i)
    shots = [data[j] for j in rng.sample([j for j in range(len(data)) if j != i], SHOTS[label])]
    template = jinja2.Template(TEMPLATES[label])
    item = data[i]
    if label == "mc_test":
        return [template.render(shots=shots, d=DELIMITERS[label], item=item, option=c) for c in item["choices"]]
    if label == "schema_test":
        return [template.render(shots=shots, d=DELIMITERS[label], item=item, option=c)
                for c in item["context_options"]]
    return [template.render(shots=shots, d=DELIMITERS[label], item=item, with_answer=False).strip(),
            template.render(shots=shots, d=DELIMITERS[label], item=item, with_answer=True)]


def continuation_spans(label, sequences):
    """(start, end) of each scored row's continuation, found by walking the token lists."""
    if label == "mc_test":
        start = 0
        while all(len(s) > start and s[start] == sequences[0][start] for s in sequences):
            start += 1
        return sequences, [(start, len(s)) for s in sequences]
    if label == "schema_test":
        shared = 0
        while all(len(s) > shared and s[-1 - shared] == sequences[0][-1 - shared] for s in sequences):
            shared += 1
        return sequences, [(len(s) - shared, len(s)) for s in sequences]
    without, with_answer = sequences
    assert with_answer[:len(without)] == without
    return [with_answer], [(len(without), len(with_answer))]


def reference_scores(hf, encode, bos, context_length, label, data):
    """Per item: (correct, per row [mean cross-entropy of the continuation, every token the argmax]),
    one row at a time through transformers' model."""
    scored = []
    with torch.no_grad():
        for i in range(len(data)):
            sequences = [[bos] + encode(p) for p in reference_prompts(label, data, i)]
            rows, spans = continuation_spans(label, sequences)
            row_scores = []
            for tokens, (start, end) in zip(rows, spans):
                cut = max(0, len(tokens) - context_length)  # keep the last context_length tokens
                tokens, start, end = tokens[cut:], start - cut, end - cut
                assert start >= 1  # the test's items never cut into a continuation
                logits = hf(torch.tensor([tokens])).logits[0].double()
                predicted, targets = logits[start - 1:end - 1], torch.tensor(tokens[start:end])
                mean_loss = F.cross_entropy(predicted, targets).item()
                row_scores.append([mean_loss, bool((predicted.argmax(dim=-1) == targets).all())])
            if label == "lm_test":
                correct = row_scores[0][1]
            else:
                losses = [loss for loss, _ in row_scores]
                correct = losses.index(min(losses)) == data[i]["gold"]
            scored.append((correct, row_scores))
    return scored


def shuffled(items, limit=None):
    items = list(items)
    random.Random(1337).shuffle(items)
    return items[:limit]


# ---------------------------------------------------------------- models

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{tokenizer: (model.json, weights, transformers model, encode, BOS id)} for random models,
    GPT-2-tokenized (with transformers' tokenizer) and byte-level."""
    root = tmp_path_factory.mktemp("core-models")
    gpt2_json, gpt2_weights, _ = write_model(root / "gpt2", GPT2_CFG)
    bytes_json, bytes_weights, _ = write_model(root / "bytes", BYTES_CFG, seed=1)
    found = {}
    for name, model_json, weights in (("gpt2", gpt2_json, gpt2_weights), ("bytes", bytes_json, bytes_weights)):
        converted = run_script("convert_gpt2.py", "to-hf", model_json, weights, root / f"hf-{name}",
                               "--tokenizer", name)
        assert converted.returncode == 0, converted.stderr
        hf = GPT2LMHeadModel.from_pretrained(root / f"hf-{name}").eval()
        if name == "gpt2":
            hf_tokenizer = AutoTokenizer.from_pretrained(root / "hf-gpt2")
            encode, bos = hf_tokenizer.encode, hf_tokenizer.bos_token_id
            found["hf_tokenizer"] = hf_tokenizer
        else:
            encode, bos = (lambda text: list(text.encode("utf-8"))), 256
        found[name] = (model_json, weights, hf, encode, bos)
    return found


@pytest.fixture(scope="module")
def items(models):
    return {**choice_items(), "lm_test": lm_items(models["gpt2"][2], models["hf_tokenizer"])}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, items):
    return write_bundle(tmp_path_factory.mktemp("bundle"), items)


# ---------------------------------------------------------------- the independent check

@pytest.mark.parametrize("tokenizer_name", ["gpt2", "bytes"])
def test_every_task_type_matches_transformers_scored_by_hand(models, items, bundle, tokenizer_name):
    model_json, weights, hf, encode, bos = models[tokenizer_name]
    model = load_model(from_model_json(model_json, weights), "cpu")
    context_length = model.cfg.context_length
    tasks = core_scoring.read_tasks(bundle)
    assert [(t.label, t.task_type, t.num_fewshot, t.continuation_delimiter, t.random_baseline) for t in tasks] == \
        [(label, kind, SHOTS[label], DELIMITERS[label], BASELINES[label]) for label, kind in
         (("mc_test", "multiple_choice"), ("schema_test", "schema"), ("lm_test", "language_modeling"))]
    truncated = 0
    for task in tasks:
        data = core_scoring.read_items(bundle, task)
        assert data == shuffled(items[task.label])
        expected = reference_scores(hf, encode, bos, context_length, task.label, data)

        encoded = core_scoring.encode_task(task, data, get_tokenizer(tokenizer_name), context_length)
        rows = [row for item in encoded for row in item.rows]
        with torch.inference_mode():
            results = core_scoring.score_rows(model, rows, batch_size=5)
        expected_rows = [row for _, item_rows in expected for row in item_rows]
        torch.testing.assert_close(results[:, 0].tolist(), [loss for loss, _ in expected_rows], rtol=1e-4, atol=1e-4)
        assert results[:, 1].tolist() == [float(hit) for _, hit in expected_rows]
        assert core_scoring.correct_per_item(encoded, results) == [correct for correct, _ in expected]
        truncated += sum(item.truncated for item in encoded)
    assert truncated > 0  # the window cut some rows


def test_the_test_tasks_are_not_trivial(models, items):
    # Each model gets some items of every task right and some wrong (the random byte model
    # never predicts a whole word): a scorer that always picked the first row, or never
    # found a continuation all argmax, would fail the check above.
    for name in ("gpt2", "bytes"):
        model_json, weights, hf, encode, bos = models[name]
        context_length = {"gpt2": GPT2_CFG, "bytes": BYTES_CFG}[name]["context_length"]
        for label in ("mc_test", "schema_test", "lm_test")[:3 if name == "gpt2" else 2]:
            correct = [c for c, _ in reference_scores(hf, encode, bos, context_length, label, shuffled(items[label]))]
            assert 0 < sum(correct) < len(correct), (name, label, correct)


def test_cli_reports_core_with_standard_errors(models, items, bundle, tmp_path):
    model_json, weights, hf, encode, bos = models["gpt2"]
    out = tmp_path / "core.json"
    result = run_script("eval_core.py", model_json, weights, "--bundle", bundle.parent, "--tokenizer", "gpt2",
                        "--limit", 10, "--batch-size", 3, "--json", out, "--cache-dir", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    centered, centered_se = [], []
    for label in ("mc_test", "schema_test", "lm_test"):
        data = shuffled(items[label], limit=10)
        correct = sum(c for c, _ in reference_scores(hf, encode, bos, GPT2_CFG["context_length"], label, data))
        p, chance = correct / 10, BASELINES[label] / 100
        task = written["tasks"][label]
        assert (task["correct"], task["items"]) == (correct, 10)
        assert task["accuracy"] == pytest.approx(p)
        assert task["accuracy_se"] == pytest.approx(math.sqrt(p * (1 - p) / 10))
        assert task["centered"] == pytest.approx((p - chance) / (1 - chance))
        assert task["centered_se"] == pytest.approx(math.sqrt(p * (1 - p) / 10) / (1 - chance))
        centered.append(task["centered"]), centered_se.append(task["centered_se"])
        assert f"{p:.4f} ± {math.sqrt(p * (1 - p) / 10):.4f}" in result.stdout
    assert written["core"] == pytest.approx(sum(centered) / 3)
    assert written["core_se"] == pytest.approx(math.sqrt(sum(se ** 2 for se in centered_se)) / 3)
    assert f"CORE: {written['core']:.4f} ± {written['core_se']:.4f}" in result.stdout
    assert written["items"] == 30 and written["truncated_items"] > 0 and written["tokenizer"] == "gpt2"

    # --tasks picks tasks; --batch-size does not change a result.
    again = run_script("eval_core.py", model_json, weights, "--bundle", bundle, "--tokenizer", "gpt2",
                       "--limit", 10, "--batch-size", 16, "--tasks", "lm_test,mc_test", "--json", tmp_path / "two.json")
    assert again.returncode == 0, again.stderr
    two = json.loads((tmp_path / "two.json").read_text())
    assert list(two["tasks"]) == ["lm_test", "mc_test"]
    for label in ("lm_test", "mc_test"):
        assert two["tasks"][label]["correct"] == written["tasks"][label]["correct"]


def test_standard_errors_by_hand():
    # 3 of 8 right on a 4-way task (baseline 25%), 9 of 10 on an open one (baseline 0).
    four_way = core_scoring.Task("a", "multiple_choice", "a.jsonl", 0, " ", 25.0)
    open_task = core_scoring.Task("b", "language_modeling", "b.jsonl", 0, " ", 0.0)
    results = [core_scoring.TaskResult(four_way, 3, 8), core_scoring.TaskResult(open_task, 9, 10)]
    se_a = math.sqrt(0.375 * 0.625 / 8)  # 0.17116...
    se_b = math.sqrt(0.9 * 0.1 / 10)  # 0.09486...
    assert results[0].accuracy_se == pytest.approx(0.171163, abs=1e-6)
    assert results[0].centered == pytest.approx((0.375 - 0.25) / 0.75)
    assert results[0].centered_se == pytest.approx(se_a / 0.75)
    assert results[1].centered == pytest.approx(0.9) and results[1].centered_se == pytest.approx(se_b)
    core, core_se = core_scoring.core_metric(results)
    assert core == pytest.approx((0.125 / 0.75 + 0.9) / 2)
    assert core_se == pytest.approx(math.sqrt((se_a / 0.75) ** 2 + se_b ** 2) / 2)
    assert core_se == pytest.approx(0.123575, abs=1e-6)


# ---------------------------------------------------------------- the bundle: zip, download, cache

class BundleServer:
    """A local HTTP server on 127.0.0.1: /eval_bundle.zip is the zip; /short.zip closes the
    connection before its Content-Length; anything else is a 404."""

    def __init__(self, body):
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path not in ("/eval_bundle.zip", "/short.zip"):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (1000 if self.path == "/short.zip" else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def run_core(model, *args):
    return run_script("eval_core.py", *model, "--tokenizer", "bytes", "--limit", 4, "--tasks", "schema_test", *args)


def test_bundle_is_downloaded_once_extracted_and_cached(tmp_path, bundle):
    model = write_model(tmp_path / "model", BYTES_CFG)[:2]
    body = zip_bundle(bundle, tmp_path / "eval_bundle.zip").read_bytes()
    server = BundleServer(body)
    try:
        cache = tmp_path / "cache"
        url = f"{server.url}/eval_bundle.zip"
        first = run_core(model, "--bundle", url, "--cache-dir", cache, "--json", tmp_path / "first.json")
        assert first.returncode == 0, first.stderr
        assert f"downloading {url}" in first.stderr
        second = run_core(model, "--bundle", url, "--cache-dir", cache, "--json", tmp_path / "second.json")
        assert second.returncode == 0, second.stderr
        assert server.requests == ["/eval_bundle.zip"]  # the second run used the cache
        zips = list(cache.glob("*.zip"))
        assert [z.read_bytes() for z in zips] == [body]
        assert not list(cache.glob("*.partial"))
        # The same result as the local directory and the local zip.
        local = run_core(model, "--bundle", bundle, "--json", tmp_path / "local.json")
        from_zip = run_core(model, "--bundle", tmp_path / "eval_bundle.zip", "--cache-dir", cache,
                            "--json", tmp_path / "zip.json")
        assert local.returncode == 0 and from_zip.returncode == 0, local.stderr + from_zip.stderr
        tasks = [json.loads((tmp_path / f"{n}.json").read_text())["tasks"] for n in ("first", "second", "local", "zip")]
        assert all(t == tasks[0] for t in tasks)

        for path, message in (("short.zip", "the connection closed after"), ("missing.zip", "HTTP Error 404")):
            failed = run_core(model, "--bundle", f"{server.url}/{path}", "--cache-dir", cache)
            # stderr also holds the download's progress bar: the error is its last line, with no traceback.
            assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
            last = failed.stderr.strip().splitlines()[-1]
            assert last.startswith(f"error: could not download {server.url}/{path}") and message in last, last
        assert sorted(p.name for p in cache.iterdir() if p.suffix in (".zip", ".partial")) == \
            [z.name for z in zips]  # nothing left of the failed downloads
    finally:
        server.close()


# ---------------------------------------------------------------- bad input

def test_bad_bundles_and_items_are_one_error_line(tmp_path, items):
    model = write_model(tmp_path / "model", BYTES_CFG)[:2]
    assert_one_error_line(run_core(model, "--bundle", tmp_path / "nowhere"), "no such bundle")
    (tmp_path / "empty").mkdir()
    assert_one_error_line(run_core(model, "--bundle", tmp_path / "empty"), "no core.yaml")
    (tmp_path / "not.zip").write_text("hello")
    assert_one_error_line(run_core(model, "--bundle", tmp_path / "not.zip", "--cache-dir", tmp_path / "c"),
                          "not.zip", "not a valid zip")

    broken = {**items, "schema_test": items["schema_test"][:3] + [{"context_options": ["a", "b"], "continuation": "c",
                                                                      "gold": 2}]}
    bundle = write_bundle(tmp_path / "broken", broken)
    assert_one_error_line(run_core(model, "--bundle", bundle), "schema.jsonl line 4", "'gold'", "context_options")
    assert_one_error_line(run_core(model, "--bundle", bundle, "--tasks", "nope"), "unknown CORE task nope",
                          "mc_test, schema_test, lm_test")
    few = write_bundle(tmp_path / "few", {**items, "mc_test": items["mc_test"][:2]})
    assert_one_error_line(run_script("eval_core.py", *model, "--tokenizer", "bytes", "--bundle", few,
                                     "--tasks", "mc_test"), "'mc_test' is 2-shot", "has 2")
    (bundle / "core.yaml").write_text(CORE_YAML.replace("schema\n", "scheme\n"))
    assert_one_error_line(run_core(model, "--bundle", bundle), "core.yaml", "schema_test", "icl_task_type")


# ---------------------------------------------------------------- in training: equal shares

@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shares_cover_every_row_once_in_equal_numbers(models, bundle, world_size):
    model_json, weights, *_ = models["bytes"]
    model = load_model(from_model_json(model_json, weights), "cpu")
    tokenizer = get_tokenizer("bytes")
    items = [item for task in core_scoring.read_tasks(bundle) for item in core_scoring.encode_task(
        task, core_scoring.read_items(bundle, task, 7), tokenizer, BYTES_CFG["context_length"])]
    rows = [row for item in items for row in item.rows]
    with torch.inference_mode():
        whole = core_scoring.score_rows(model, rows, batch_size=4)
    # What the all-reduce adds up: each rank's results in its rows' places, zeros elsewhere.
    summed = torch.zeros(len(rows), 2)
    shares = [core_scoring.rank_rows(rows, rank, world_size) for rank in range(world_size)]
    assert len({len(share_rows) for share_rows, _ in shares}) == 1  # as many forward passes on every rank
    assert sorted(i for _, indices in shares for i in indices) == list(range(len(rows)))
    for share_rows, indices in shares:
        with torch.inference_mode():
            mine = core_scoring.score_rows(model, share_rows, batch_size=4)
        summed[indices] += mine[:len(indices)]
    torch.testing.assert_close(summed, whole)
    assert core_scoring.correct_per_item(items, summed) == core_scoring.correct_per_item(items, whole)


def test_in_training_core_on_one_rank_matches_transformers(tmp_path, models, items, bundle):
    # distributed_core's all-reduce on a real (one-process, gloo) process group.
    model_json, weights, hf, encode, bos = models["gpt2"]
    model = load_model(from_model_json(model_json, weights), "cpu")
    train = TrainConfig.from_dict({"dataset": "unused", "microbatch_size": 5, "core_interval": 10,
                                   "core_items": 10, "core_tasks": "schema_test,lm_test,mc_test",
                                   "core_bundle": str(zip_bundle(bundle, tmp_path / "eval_bundle.zip"))})
    run = SimpleNamespace(train=train, model=model.cfg)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ctx = SimpleNamespace(rank=0, world_size=1, is_main=True, is_local_main=True)
        share = core_scoring.training_share(run, ctx, tmp_path / "datasets", "gpt2")
        model.train()
        logged = core_scoring.distributed_core(model, share, autocast_dtype=None)
    finally:
        dist.destroy_process_group()
    assert model.training  # back in train mode
    assert list((tmp_path / "datasets" / "core").iterdir())  # the zip's extraction is cached there
    centered = {}
    for label in ("schema_test", "lm_test", "mc_test"):
        correct = sum(c for c, _ in reference_scores(hf, encode, bos, GPT2_CFG["context_length"], label,
                                                     shuffled(items[label], limit=10)))
        chance = BASELINES[label] / 100
        centered[label] = (correct / 10 - chance) / (1 - chance)
        assert logged[f"core/{label}"] == pytest.approx(centered[label])
    assert logged["core"] == pytest.approx(sum(centered.values()) / 3)
    assert set(logged) == {"core", "core_se", "core/schema_test", "core/lm_test", "core/mc_test"}


@pytest.mark.parametrize("key, value, message", [
    ("core_interval", 0, "must be positive"), ("core_items", -1, "must be positive"),
    ("core_tasks", "piqa,,arc_easy", "comma-separated task labels"), ("core_bundle", "", "non-empty string"),
    ("core_tasks", ["piqa"], "must be a string or null")])
def test_core_keys_are_validated(key, value, message):
    with pytest.raises(UserError, match=message) as raised:
        TrainConfig.from_dict({"dataset": "d", "microbatch_size": 2, key: value})
    assert f"key '{key}'" in str(raised.value)


# ---------------------------------------------------------------- in training: ddp_train.py on 2 ranks

CORE_ITEMS = 6


@pytest.fixture(scope="module")
def core_run(tmp_path_factory, verdict_dataset, bundle):
    """4 steps on 2 ranks (torchrun, gloo), checkpointed at 0, 2 and 3, CORE every 2 steps and the last."""
    root = tmp_path_factory.mktemp("core-training")
    run_dir = make_run(root / "run", verdict_dataset, min_train_tokens=tokens_for(4, 2), checkpoint_interval=2,
                       core_interval=2, core_items=CORE_ITEMS, core_bundle=str(bundle), tensorboard=True)
    run_training([run_dir, root / "datasets"], nproc=2)
    return run_dir


@pytest.mark.e2e
def test_core_logged_in_training_is_the_scripts_on_that_steps_checkpoint(core_run, bundle, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    evaluated = {row["step"]: row for row in read_rows(core_run) if "core" in row}
    assert sorted(evaluated) == [0, 2, 3]  # every core_interval steps, and the last
    for step in (2, 3):  # a checkpoint holds the weights after its step, the ones that step scored
        [checkpoint] = (core_run / "checkpoints").glob(f"*-iteration-{step}")
        out = tmp_path / f"step-{step}.json"
        result = run_script("eval_core.py", core_run, checkpoint / "model.safetensors", "--bundle", bundle,
                            "--limit", CORE_ITEMS, "--json", out)
        assert result.returncode == 0, result.stderr
        written = json.loads(out.read_text())
        assert written["tokenizer"] == "bytes"
        for label, task in written["tasks"].items():
            assert evaluated[step][f"core/{label}"] == pytest.approx(task["centered"], abs=1e-12)
        assert (evaluated[step]["core"], evaluated[step]["core_se"]) == \
            pytest.approx((written["core"], written["core_se"]), abs=1e-12)

    events = EventAccumulator(str(core_run / "tb"))
    events.Reload()
    for key, tag in (("core", "core/CORE"), ("core_se", "core/CORE_se"), ("core/lm_test", "core/lm_test")):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == \
            [(step, pytest.approx(row[key])) for step, row in sorted(evaluated.items())]


def test_loss_chart_shows_core_when_the_rows_have_it(tmp_path):
    rows = [{"step": s, "loss": 3.0 - s / 100, "val_loss": None} for s in range(50)]
    charts.plot_loss(rows, tmp_path / "plain.png")
    charts.plot_loss([{**row, "core": 0.01 * row["step"], "core_se": 0.02} if row["step"] % 10 == 0 else row
                      for row in rows], tmp_path / "core.png")
    with Image.open(tmp_path / "plain.png") as plain, Image.open(tmp_path / "core.png") as with_core:
        assert plain.size == with_core.size and not np.array_equal(np.asarray(plain), np.asarray(with_core))
