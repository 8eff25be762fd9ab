"""Benchmark prepare_datasets.py: throughput against tiktoken alone, memory against corpus size.

    TIKTOKEN_CACHE_DIR=... uv run bench_prepare.py --megabytes 50 --scale 10 --workers 2 --repeats 3

Writes a synthetic English-like corpus to a temporary directory as JSONL (documents of
log-normal length; words drawn with Zipf frequencies from a fixed list of common English
words, their inflections and capitalized forms, with commas, full stops and paragraph
breaks; fixed seed), then measures, alternating the two so that background load hits
both alike:

- ceiling: tiktoken `encode_ordinary_batch(texts, num_threads=W)` on the same texts already
  in memory, 1024 documents per call: GPT-2 tokenization and nothing else, on W threads
  (tiktoken releases the GIL while encoding, so W threads can use W cores);
- the same with the call the workers make, `encode_to_numpy` (ids in a buffer, not a list
  of Python ints), on W threads: what the pipeline adds on top of its own tokenizer call;
- pipeline: `prepare_datasets.py --workers W` run as a subprocess and timed from launch to
  exit, so interpreter start-up, reading and parsing the JSONL and writing the files count.

All tokenize the same texts, so throughput relative to a ceiling is the ratio of their
times. On a shared machine wall time depends on what else runs, so CPU time (user + sys,
workers included) is reported too: tokens per CPU-second compares the work done whatever
the load. Then the pipeline runs on a corpus --scale times larger, and the peak RSS of the
two runs is compared: the sum of the resident sets of prepare_datasets.py and its workers,
sampled from /proc every 20 ms (Linux only). Pages shared between those processes count
once per process, so the sum overstates the memory really used.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import tiktoken

SCRIPT = Path(__file__).resolve().parent / "prepare_datasets.py"
SEED = 1234
# Common English words, most frequent first (their order sets their Zipf rank).
COMMON_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look more
day could go come did number sound no most people my over know water than call first who may down side been
now find any new work part take get place made live where after back little only round man year came show
every good me give our under name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air well also play small end put
home read hand port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father head stand own
page should country found answer school grow study still learn plant cover food sun four between state keep
eye never last let thought city tree cross farm hard start might story saw far sea draw left late run while
press close night real life few north open seem together next white children begin got walk example ease paper
group always music those both mark often letter until mile river car feet care second book carry took science
eat room friend began idea fish mountain stop once base hear horse cut sure watch color face wood main enough
plain girl usual young ready above ever red list though feel talk bird soon body dog family direct pose leave
song measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during hundred
five remember step early hold west ground interest reach fast verb sing listen six table travel less morning
ten simple several vowel toward war lay against pattern slow center love person money serve appear road map
rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine note wait
plan figure star box noun field rest correct able pound done beauty drive stood contain front teach week final
gave green oh quick develop ocean warm free minute strong special mind behind clear tail produce fact street
inch multiply nothing course stay wheel full force blue object decide surface deep moon island foot system
busy test record boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape
equate hot miss brought heat snow tire bring yes distant fill east paint language among grand ball yet wave
drop heart am present heavy dance engine position arm wide sail material size vary settle speak weight general
ice matter circle pair include divide syllable felt perhaps pick sudden count square reason length represent
art subject region energy hunt probable bed brother egg ride cell believe fraction forest sit race window store
summer train sleep prove lone leg exercise wall catch mount wish sky board joy winter sat written wild
instrument kept glass grass cow job edge sign visit past soft fun bright gas weather month million bear finish
happy hope flower clothe strange gone jump baby eight village meet root buy raise solve metal whether push
seven paragraph third shall held hair describe cook floor either result burn hill safe cat century consider
type law bit coast copy phrase silent tall sand soil roll temperature finger industry value fight lie beat
excite natural view sense ear else quite broke case middle kill son lake moment scale loud spring observe
child straight consonant nation dictionary milk speed method organ pay age section dress cloud surprise quiet
stone tiny climb cool design poor lot experiment bottom key iron single stick flat twenty skin smile crease
hole trade melody trip office receive row mouth exact symbol die least trouble shout except wrote seed tone
join suggest clean break lady yard rise bad blow oil blood touch grew cent mix team wire cost lost brown wear
garden equal sent choose fell fit flow fair bank collect save control decimal gentle woman captain practice
separate difficult doctor please protect noon whose locate ring character insect caught period indicate radio
spoke atom human history effect electric expect crop modern element hit student corner party supply bone rail
imagine provide agree thus capital chair danger fruit rich thick soldier process operate guess necessary sharp
wing create neighbor wash bat rather crowd corn compare poem string bell depend meat rub tube famous dollar
stream fear sight thin triangle planet hurry chief colony clock mine tie enter major fresh search send yellow
gun allow print dead spot desert suit current lift rose continue block chart hat sell success company subtract
event particular deal swim term opposite wife shoe shoulder spread arrange camp invent cotton born determine
quart nine truck noise level chance gather shop stretch throw shine property column molecule select wrong gray
repeat require broad prepare salt nose plural anger claim continent oxygen sugar death pretty skill women
season solution magnet silver thank branch match suffix especially fig afraid huge sister steel discuss forward
similar guide experience score apple bought led pitch coat mass card band rope slip win dream evening condition
feed tool total basic smell valley nor double seat arrive master track parent shore division sheet substance
favor connect post spend chord fat glad original share station dad bread charge proper bar offer segment
duck instant market degree populate chick dear enemy reply drink occur support speech nature range steam motion
path liquid log meant quotient teeth shell neck
""".split()
SUFFIXES = ["s", "ed", "ing", "ly", "er", "ness", "ation", "ment", "able"]
# Probabilities of the non-word tokens; the words share the rest.
MARKS = {",": 0.06, ".": 0.05, "\n\n": 0.004}
WORDS_PER_DOCUMENT = dict(mean=6.0, sigma=0.9)  # log-normal: median ~400 words, long tail
CEILING_CHUNK = 1024  # documents per encode_ordinary_batch call


# ---------------------------------------------------------------- the synthetic corpus

def vocabulary():
    """Tokens to draw and their probabilities: words by Zipf rank (common words, then their
    rarer inflected and capitalized forms), then punctuation."""
    words = COMMON_WORDS + [word + suffix for suffix in SUFFIXES for word in COMMON_WORDS]
    words += [word.capitalize() for word in COMMON_WORDS]
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    probabilities = np.append(zipf / zipf.sum() * (1 - sum(MARKS.values())), list(MARKS.values()))
    return np.array(words + list(MARKS), dtype=object), probabilities


def synthetic_documents(rng, num_bytes):
    """English-like documents of about `num_bytes` in total."""
    tokens, probabilities = vocabulary()
    written = 0
    while written < num_bytes:
        length = max(20, int(rng.lognormal(**WORDS_PER_DOCUMENT)))
        text = " ".join(rng.choice(tokens, size=length, p=probabilities))
        text = text.replace(" ,", ",").replace(" .", ".").replace(" \n\n ", "\n\n").strip()
        written += len(text)
        yield text


def write_corpus(path, num_bytes):
    with open(path, "w") as f:
        for text in synthetic_documents(np.random.default_rng(SEED), num_bytes):
            f.write(json.dumps({"text": text}) + "\n")


# ---------------------------------------------------------------- measuring

def tree_rss_bytes(pid):
    """Resident set of `pid` and all its descendants, from /proc."""
    total, pending = 0, [pid]
    while pending:
        pid = pending.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            pending += [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except (OSError, IndexError):  # the process ended between listing and reading
            pass
    return total


@dataclass
class Timing:
    seconds: float
    cpu_seconds: float


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_pipeline(corpus, out_dir, workers):
    """Run prepare_datasets.py; returns (Timing, peak RSS bytes of its process tree, meta.json)."""
    command = [sys.executable, str(SCRIPT), str(out_dir), str(corpus), "--workers", str(workers), "--overwrite"]
    start, cpu_start = time.perf_counter(), children_cpu_seconds()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ)
    peak = 0

    def sample():
        nonlocal peak
        while process.poll() is None:
            peak = max(peak, tree_rss_bytes(process.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output = process.communicate()[0]
    # The workers are reaped by prepare_datasets.py, so their CPU time is in its children's.
    timing = Timing(time.perf_counter() - start, children_cpu_seconds() - cpu_start)
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"prepare_datasets.py failed:\n{output.decode()}")
    return timing, peak, json.loads((out_dir / "meta.json").read_text())


def encode_ordinary_batch(encoding, texts, workers):
    # In chunks, so that the ceiling does not have to hold every token of the corpus
    # as a Python int at once (gigabytes for the larger corpus).
    return sum(len(tokens) for start in range(0, len(texts), CEILING_CHUNK)
               for tokens in encoding.encode_ordinary_batch(texts[start:start + CEILING_CHUNK], num_threads=workers))


def encode_to_numpy(encoding, texts, workers):
    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(lambda text: len(encoding.encode_to_numpy(text, disallowed_special=())), texts))


def time_ceiling(encode, texts, workers):
    """(Timing, tokens) of `encode` on the texts: tokenization and nothing else."""
    encoding = tiktoken.get_encoding("gpt2")
    start, cpu_start = time.perf_counter(), time.process_time()
    tokens = encode(encoding, texts, workers)
    return Timing(time.perf_counter() - start, time.process_time() - cpu_start), tokens


def median_timing(timings):
    return Timing(statistics.median(t.seconds for t in timings), statistics.median(t.cpu_seconds for t in timings))


def report(name, timings, tokens, documents):
    timing = median_timing(timings)
    runs = ", ".join(f"{t.seconds:.2f}" for t in timings)
    click.echo(f"{name}: {timing.seconds:.2f} s (runs: {runs} s), {tokens / timing.seconds:,.0f} tokens/s, "
               f"{documents / timing.seconds:,.0f} documents/s, "
               f"{tokens / timing.cpu_seconds:,.0f} tokens per CPU-second")
    return timing


def machine_description():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return (f"{os.cpu_count()} x {cpu}, {memory_kb / 2**20:.0f} GiB RAM, {platform.platform()}, "
            f"Python {platform.python_version()}, tiktoken {tiktoken.__version__}")


# ---------------------------------------------------------------- command line

def compare(corpus, workers, repeats, out_dir):
    """Ceilings and pipeline on `corpus`, alternating, `repeats` times; prints the medians
    and returns the pipeline's peak RSS."""
    texts = [json.loads(line)["text"] for line in corpus.open()]
    click.echo(f"{corpus.name}: {len(texts):,} documents, {corpus.stat().st_size / 1e6:.1f} MB of JSONL")
    timings = {"ceiling": [], "ceiling_numpy": [], "pipeline": []}
    peaks = []
    for _ in range(repeats):
        timing, text_tokens = time_ceiling(encode_ordinary_batch, texts, workers)
        timings["ceiling"].append(timing)
        timing, _ = time_ceiling(encode_to_numpy, texts, workers)
        timings["ceiling_numpy"].append(timing)
        timing, peak, meta = run_pipeline(corpus, out_dir, workers)
        timings["pipeline"].append(timing)
        peaks.append(peak)
    # The pipeline's tokens include one end-of-text per document; the ceilings' do not.
    ceiling = report(f"  ceiling, encode_ordinary_batch on {workers} threads", timings["ceiling"],
                     text_tokens, len(texts))
    ceiling_numpy = report(f"  encode_to_numpy on {workers} threads", timings["ceiling_numpy"], text_tokens, len(texts))
    pipeline = report(f"  pipeline, prepare_datasets.py --workers {workers} (tokens incl. end-of-text)",
                      timings["pipeline"], sum(meta["tokens"].values()), len(texts))
    click.echo(f"  pipeline throughput / ceiling: {ceiling.seconds / pipeline.seconds:.0%} wall-clock, "
               f"{ceiling.cpu_seconds / pipeline.cpu_seconds:.0%} per CPU-second (target >= 80%)")
    click.echo(f"  pipeline throughput / encode_to_numpy: {ceiling_numpy.seconds / pipeline.seconds:.0%} wall-clock, "
               f"{ceiling_numpy.cpu_seconds / pipeline.cpu_seconds:.0%} per CPU-second")
    click.echo(f"  pipeline peak RSS of the process tree: {max(peaks) / 2**20:.0f} MiB")
    return max(peaks)


@click.command(epilog="""\b
Example:
  uv run bench_prepare.py --megabytes 50 --scale 10 --workers 2 --repeats 3""")
@click.option("--megabytes", type=float, default=50, show_default=True, help="Size of the smaller corpus (MB of text).")
@click.option("--scale", type=int, default=10, show_default=True, help="The larger corpus is this many times bigger.")
@click.option("--workers", type=int, default=os.cpu_count(), show_default="CPU count")
@click.option("--repeats", type=int, default=3, show_default=True,
              help="Alternating ceiling/pipeline runs on the smaller corpus (medians kept); once on the larger.")
@click.option("--tmp-dir", type=click.Path(file_okay=False, path_type=Path), help="Where to put the corpora.")
def main(megabytes, scale, workers, repeats, tmp_dir):
    """Benchmark prepare_datasets.py (see the top of bench_prepare.py)."""
    click.echo(f"machine: {machine_description()}")
    click.echo(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        small, large = Path(tmp) / "small.jsonl", Path(tmp) / "large.jsonl"
        write_corpus(small, megabytes * 1e6)
        small_peak = compare(small, workers, repeats, Path(tmp) / "out")
        small.unlink()
        write_corpus(large, scale * megabytes * 1e6)
        large_peak = compare(large, workers, 1, Path(tmp) / "out")
    click.echo(f"peak RSS, {scale}x larger corpus minus smaller: {(large_peak - small_peak) / 2**20:+.0f} MiB "
               "(target <= +100 MB)")
    click.echo(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
