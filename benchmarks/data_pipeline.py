"""How fast is the data pipeline, and how much memory does it take, on a corpus larger than memory?

    python benchmarks/data_pipeline.py [--gb=2] [--small_gb=0.25] [--workdir=/tmp/lmjax_data_bench]
    python benchmarks/data_pipeline.py --config=configs/gpt_small.py [--batches=500]
    python benchmarks/data_pipeline.py --readers [--virtual_tokens=26e9]

Without --config: generates two seeded corpora from the embedded corpus (windows of this
interpreter's standard library files, one JSON line per document; never committed: they live under
--workdir), prepares a GPT-2-tokenized token store of each (`lmjax.data.prepare --store`) in a
child process, then reads batches of gpt2_124m rows from each store in another child process.
Each child reports its own peak RSS. Reader throughput is set against what a gpt2_124m train step
on a v5e-16 consumes per host, from the AOT step-time estimate (FLOPs at 50% MFU). Results go to
benchmarks/results/data_pipeline.md.

With --readers: on the stores an earlier run left under --workdir, plus a sparse store of
--virtual_tokens zero tokens (the size of gpt_1b's corpus, on no disk space), reads the same batches
(same global shuffle, checked by a digest of the first batches) with lmjax's reader and with a
reader built from grain's MapDataset ops (grain's global shuffle, a row data source, batch,
to_iter_dataset with prefetch threads), each in its own process: batches/s and peak RSS. Appends a
"Readers" section to the results file.

With --config: prints the in-memory pipeline's one-time costs (tokenizer training, tokenizing each
split) and its steady-state tokens/s at the preset's batch shape.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
_TIKTOKEN = os.path.join(ROOT, "..", "shared", "data", "tiktoken")  # GPT-2's BPE file, offline (else downloaded)
if os.path.isdir(_TIKTOKEN):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.abspath(_TIKTOKEN))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lmjax import cli  # noqa: E402
from lmjax import config as config_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Measure the in-memory pipeline of this preset instead.")
_BATCHES = flags.DEFINE_integer("batches", 500, "Batches to time.")
_GB = flags.DEFINE_float("gb", 2.0, "size of the large generated corpus, in GB of text.")
_SMALL_GB = flags.DEFINE_float("small_gb", 0.25, "size of the small corpus (reader RSS at two sizes).")
_WORKDIR = flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "lmjax_data_bench"),
                               "where corpora and stores are written.")
_RESULTS = flags.DEFINE_string("results", os.path.join(ROOT, "benchmarks", "results", "data_pipeline.md"), "Results file.")
_READ_SECONDS = flags.DEFINE_float("read_seconds", 20.0, "seconds of reading per measurement.")
_READERS = flags.DEFINE_bool("readers", False, "Compare lmjax's reader with a grain MapDataset reader instead.")
_VIRTUAL_TOKENS = flags.DEFINE_float("virtual_tokens", 26e9, "--readers: tokens of the sparse (all-zero) store.")
_LATENCY_MS = flags.DEFINE_float("latency_ms", 20.0, "--readers: latency of each request to the simulated bucket.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one measured step (prepare | read) and print JSON.")
_ARGS = flags.DEFINE_list("args", [], "Internal: arguments of --child.")

SEED = 0
FILE_BYTES = 128 << 20  # text per generated .jsonl file


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# the generated corpus


def generate_corpus(directory: str, nbytes: int) -> dict:
    """Documents that are random windows of lines of the stdlib files, seeded: >= nbytes of text."""
    import numpy as np

    from lmjax.data import sources

    marker = os.path.join(directory, "corpus.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            meta = json.load(f)
        if meta["nbytes_wanted"] == nbytes and meta["seed"] == SEED:
            return meta
    os.makedirs(directory, exist_ok=True)
    root = sources.pystdlib_root()
    files = [[line for line in sources._read_text(os.path.join(root, f)).splitlines(keepends=True)]
             for f in sources.pystdlib_files()]
    files = [lines for lines in files if lines]
    rng = np.random.default_rng(SEED)
    total = docs = part = 0
    start = time.perf_counter()
    while total < nbytes:
        written = 0
        with open(os.path.join(directory, f"part-{part:04d}.jsonl"), "w", encoding="utf-8") as out:
            while written < FILE_BYTES and total < nbytes:
                lines = files[int(rng.integers(len(files)))]
                first = int(rng.integers(len(lines)))
                count = int(rng.integers(20, 400))
                text = "".join(lines[first : first + count])
                out.write(json.dumps({"text": text}) + "\n")
                n = len(text.encode("utf-8", "surrogatepass"))
                written += n
                total += n
                docs += 1
        part += 1
    meta = {"nbytes_wanted": nbytes, "nbytes": total, "docs": docs, "files": part, "seed": SEED,
            "python": sys.version.split()[0], "seconds": time.perf_counter() - start}
    with open(marker, "w") as f:
        json.dump(meta, f)
    return meta


def data_config(corpus_dir: str):
    c = config_lib.load("configs/gpt2_124m.py")
    c.data.source = f"text:{corpus_dir}/*.jsonl"
    c.data.val_fraction = 0.001
    return c


# ---------------------------------------------------------------------------------------------
# children: one measured step each, in a fresh process


def child_prepare(corpus_dir: str, store_dir: str) -> dict:
    from lmjax.data import prepare

    c = data_config(corpus_dir)
    start = time.perf_counter()
    index = prepare.prepare_store(c.data, store_dir, log=lambda s: print(s, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    splits = index["splits"].values()
    return {"seconds": seconds, "bytes": sum(s["num_bytes"] for s in splits),
            "tokens": sum(s["num_tokens"] for s in splits), "shards": sum(len(s["shards"]) for s in splits),
            "peak_rss": peak_rss_bytes()}


def child_read(store_dir: str, packing: str, global_batch: str, rows_per_host: str, read_seconds: str) -> dict:
    from lmjax.data import build_tokenizer, make_pipeline

    c = data_config(store_dir)
    c.data.source = f"store:{store_dir}"
    c.data.packing = packing
    start = time.perf_counter()
    tokenizer = build_tokenizer(c.data)
    pipe = make_pipeline(c.data, tokenizer, "train", int(global_batch), rows=(0, int(rows_per_host)))
    startup = time.perf_counter() - start
    next(pipe)
    tokens = batches = 0
    start = time.perf_counter()
    while time.perf_counter() - start < float(read_seconds):
        tokens += int(next(pipe)["inputs"].size)
        batches += 1
    seconds = time.perf_counter() - start
    return {"startup_seconds": startup, "batches": batches, "tokens_per_second": tokens / seconds,
            "rows_per_epoch": pipe.rows_per_epoch, "peak_rss": peak_rss_bytes()}


DIGEST_BATCHES = 20  # batches whose digest shows two readers serve the same rows in the same order


def _timed(batches_iter, read_seconds: float) -> dict:
    """Digest of the first DIGEST_BATCHES batches, then batches/s for read_seconds."""
    import hashlib

    digest = hashlib.sha256()
    for _ in range(DIGEST_BATCHES):
        batch = next(batches_iter)
        for key in ("inputs", "targets", "weights"):
            digest.update(batch[key].tobytes())
    batches = tokens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < read_seconds:
        tokens += int(next(batches_iter)["inputs"].size)
        batches += 1
    seconds = time.perf_counter() - start
    return {"digest": digest.hexdigest()[:16], "batches_per_second": batches / seconds,
            "tokens_per_second": tokens / seconds, "peak_rss": peak_rss_bytes()}


def _reader_setup(store_dir: str):
    from lmjax.data import build_tokenizer, pipeline

    c = data_config(store_dir)
    c.data.source = f"store:{store_dir}"
    c.data.packing = "concat"
    return c, build_tokenizer(c.data), pipeline


def child_read_lmjax(store_dir: str, global_batch: str, rows_per_host: str, read_seconds: str) -> dict:
    c, tokenizer, pipeline = _reader_setup(store_dir)
    start = time.perf_counter()
    pipe = pipeline.make_pipeline(c.data, tokenizer, "train", int(global_batch), rows=(0, int(rows_per_host)))
    startup = time.perf_counter() - start
    return {"startup_seconds": startup, "rows_per_epoch": pipe.rows_per_epoch, **_timed(pipe, float(read_seconds))}


class StoreRows:
    """Row i of a packed split: a grain random-access data source."""

    def __init__(self, packer):
        self.packer = packer

    def __len__(self) -> int:
        return self.packer.num_rows

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.packer.rows(np.array([int(i)])).items()}


def child_read_grain(store_dir: str, global_batch: str, rows_per_host: str, read_seconds: str, threads: str) -> dict:
    """The same batches from grain's own ops: global shuffle of row indices, this host's positions
    of every global batch, a row data source, batch, and an iterator with prefetch threads."""
    import grain

    c, tokenizer, pipeline = _reader_setup(store_dir)
    batch_size, rows = int(global_batch), int(rows_per_host)
    start = time.perf_counter()
    packer, _ = pipeline.packed_split(c.data, tokenizer, "train")
    seed = pipeline.BatchFn(packer, batch_size, (0, rows), (int(c.data.seed), 0), True).shuffle_seed()
    order = grain.MapDataset.range(packer.num_rows).shuffle(seed=seed)  # global position -> row, per epoch
    source = StoreRows(packer)
    ds = (grain.MapDataset.range(2**62)
          .map(lambda j: (j // rows) * batch_size + j % rows)  # this host's positions (rows 0..rows-1 of each batch)
          .map(lambda k: source[order[k]])
          .batch(rows))
    options = grain.ReadOptions(num_threads=int(threads), prefetch_buffer_size=4 * rows if int(threads) else 0)
    batches = iter(ds.to_iter_dataset(options))
    startup = time.perf_counter() - start
    return {"startup_seconds": startup, "rows_per_epoch": packer.num_rows, **_timed(batches, float(read_seconds))}


def register_slow_filesystem(latency_ms: float) -> None:
    """`slowfile://PATH`: a local file whose every read waits `latency_ms` first, like a request to
    a bucket (the reader reads a store behind a URL one ranged request per row)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    class SlowLocalFileSystem(LocalFileSystem):
        protocol = "slowfile"

        def cat_file(self, path, start=None, end=None, **kwargs):
            time.sleep(latency_ms / 1e3)
            return super().cat_file(path, start=start, end=end, **kwargs)

    fsspec.register_implementation("slowfile", SlowLocalFileSystem, clobber=True)


def child_read_slow(store_dir: str, global_batch: str, rows_per_host: str, read_seconds: str, threads: str,
                    latency_ms: str) -> dict:
    """lmjax's reader on the store behind `slowfile://`, with `threads` grain threads reading ahead."""
    register_slow_filesystem(float(latency_ms))
    c, tokenizer, pipeline = _reader_setup(store_dir)
    c.data.source = f"store:slowfile://{store_dir}"
    c.data.prefetch_threads = int(threads)
    start = time.perf_counter()
    pipe = pipeline.make_pipeline(c.data, tokenizer, "train", int(global_batch), rows=(0, int(rows_per_host)))
    startup = time.perf_counter() - start
    out = {"startup_seconds": startup, "rows_per_epoch": pipe.rows_per_epoch, **_timed(pipe, float(read_seconds))}
    pipe.close()
    return out


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_held_permutation(num_rows: str) -> dict:
    """Resident memory that drawn permutations of all rows for two epochs hold (the reader's
    former shuffle kept the current and the previous epoch's)."""
    before = resident_bytes()
    perms = [np.random.default_rng([0, 0, epoch]).permutation(int(num_rows)) for epoch in (0, 1)]
    return {"added": resident_bytes() - before, "rows": int(num_rows), "entries": sum(len(p) for p in perms)}


def sparse_store(directory: str, like: str, num_tokens: int) -> str:
    """A store of `num_tokens` zero tokens in sparse shard files (no disk space), with the index
    and tokenizer of the store `like`: for the reader's memory at a corpus size no disk here holds."""
    from lmjax.data import store

    index = store.read_index(like)
    shard_tokens = int(index["shard_tokens"])
    shards = []
    os.makedirs(os.path.join(directory, "train"), exist_ok=True)
    for i, first in enumerate(range(0, num_tokens, shard_tokens)):
        n = min(shard_tokens, num_tokens - first)
        with open(os.path.join(directory, "train", f"{i:05d}.tokens"), "wb") as f:
            f.truncate(n * np.dtype(index["dtype"]).itemsize)
        shards.append({"name": f"{i:05d}", "num_tokens": n, "num_docs": 1, "num_bytes": 2 * n, "digest": "sparse"})
    counts = np.zeros(index["tokenizer"]["vocab_size"], np.int64)
    counts[0] = num_tokens
    np.save(os.path.join(directory, "train", store.COUNTS), counts)
    split = {"num_tokens": num_tokens, "num_docs": len(shards), "num_bytes": 2 * num_tokens, "digest": "sparse",
             "shards": shards}
    with open(os.path.join(directory, store.INDEX), "w") as f:
        json.dump(dict(index, source={"source": f"sparse:{num_tokens}"}, splits={"train": split}), f)
    return directory


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={args[0]}",
                           f"--args={','.join(args[1:])}"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def consumption() -> dict:
    """Tokens/s a gpt2_124m train step on a v5e-16 consumes, per host, from the AOT estimate."""
    from lmjax import aot, hardware

    config = config_lib.load("configs/gpt2_124m.py")
    tpu = hardware.get_slice("v5e-16")
    flops, seconds = aot.step_estimate(config, tpu.chip, tpu.num_devices)
    tokens = int(config.train.batch_size) * int(config.data.seq_len)
    return {"global_batch": int(config.train.batch_size), "seq_len": int(config.data.seq_len), "hosts": tpu.num_hosts,
            "step_seconds": seconds, "tokens_per_second_per_host": tokens / seconds / tpu.num_hosts}


def measure_store() -> None:
    GB = 1e9
    need = consumption()
    rows_per_host = need["global_batch"] // need["hosts"]
    lines = ["# Data pipeline: token store on a generated corpus", "",
             f"Run by `python benchmarks/data_pipeline.py --gb={_GB.value} --small_gb={_SMALL_GB.value}` on a "
             f"shared {os.cpu_count()}-core CPU machine, Python {sys.version.split()[0]}. Corpora: seeded windows of "
             f"the standard library's files (JSON lines, {FILE_BYTES >> 20} MiB per file), GPT-2 tokenizer "
             "(tiktoken `r50k_base`, `encode_ordinary_batch` on all cores), 64M-token shards. Each step runs in "
             "its own process and reports its own peak RSS (`ru_maxrss`).", "",
             "| corpus | text | docs | prepare | MB/s of text | tokens | tokens/s | prepare peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    load_before = os.getloadavg()[1]
    reads = []
    for name, gb in (("small", _SMALL_GB.value), ("large", _GB.value)):
        corpus = os.path.join(_WORKDIR.value, f"corpus-{gb:g}gb")
        store_dir = os.path.join(_WORKDIR.value, f"store-{gb:g}gb")
        meta = generate_corpus(corpus, int(gb * GB))
        print(f"{name}: corpus {meta['nbytes'] / GB:.2f} GB, {meta['docs']:,} docs", flush=True)
        prep = run_child("prepare", corpus, store_dir)
        print(f"{name}: prepare {prep}", flush=True)
        lines.append(f"| {name} | {meta['nbytes'] / GB:.2f} GB | {meta['docs']:,} | {prep['seconds']:.0f} s | "
                     f"{prep['bytes'] / 1e6 / prep['seconds']:.1f} | {prep['tokens'] / 1e6:,.0f}M | "
                     f"{prep['tokens'] / prep['seconds'] / 1e6:.2f}M | {prep['peak_rss'] / 2**30:.2f} GiB |")
        for packing in ("concat", "segments"):
            r = run_child("read", store_dir, packing, str(need["global_batch"]), str(rows_per_host),
                          str(_READ_SECONDS.value))
            print(f"{name}: read {packing} {r}", flush=True)
            reads.append((name, meta, packing, r))
    lines += ["", f"Reader: one host of a v5e-16 ({need['hosts']} hosts) reading its {rows_per_host} rows of each "
              f"global batch of {need['global_batch']} x {need['seq_len']} (`gpt2_124m`), for "
              f"{_READ_SECONDS.value:.0f} s after the first batch. A v5e-16 step of gpt2_124m takes "
              f"{need['step_seconds'] * 1e3:.2f} ms at 50% MFU (`lmjax.aot.step_estimate`), so each host "
              f"consumes {need['tokens_per_second_per_host'] / 1e6:.2f}M tokens/s.", "",
              "| corpus | packing | rows/epoch | startup | tokens/s | x consumption | reader peak RSS |",
              "|---|---|---|---|---|---|---|"]
    for name, meta, packing, r in reads:
        lines.append(f"| {name} ({meta['nbytes'] / GB:.2f} GB) | {packing} | {r['rows_per_epoch']:,} | "
                     f"{r['startup_seconds']:.1f} s | {r['tokens_per_second'] / 1e6:.1f}M | "
                     f"{r['tokens_per_second'] / need['tokens_per_second_per_host']:.1f} | "
                     f"{r['peak_rss'] / 2**30:.2f} GiB |")
    lines += ["", f"5-minute load average of the shared machine: {load_before:.1f} at the start, "
              f"{os.getloadavg()[1]:.1f} at the end (on {os.cpu_count()} cores): throughputs are those of a busy machine."]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(_RESULTS.value, "w") as f:
        f.write(text)


def measure_readers() -> None:
    """lmjax's reader against grain's MapDataset ops on the same stores and batches."""
    need = consumption()
    rows_per_host = need["global_batch"] // need["hosts"]
    large = os.path.join(_WORKDIR.value, f"store-{_GB.value:g}gb")
    virtual = os.path.join(_WORKDIR.value, f"store-sparse-{_VIRTUAL_TOKENS.value:g}")
    stores = [(f"{_SMALL_GB.value:g} GB of text", os.path.join(_WORKDIR.value, f"store-{_SMALL_GB.value:g}gb")),
              (f"{_GB.value:g} GB of text", large),
              (f"{_VIRTUAL_TOKENS.value / 1e9:g}B zero tokens (sparse)",
               sparse_store(virtual, large, int(_VIRTUAL_TOKENS.value)))]
    readers = [("lmjax (in-process)", ("read_lmjax",)),
               ("grain MapDataset, no threads", ("read_grain", "0")),
               ("grain MapDataset, 16 prefetch threads", ("read_grain", "16"))]
    load_before = os.getloadavg()[1]
    rows_of = {}
    lines = ["", "## Readers: lmjax's against grain's MapDataset", "",
             f"Run by `python benchmarks/data_pipeline.py --readers --virtual_tokens={_VIRTUAL_TOKENS.value:.0f}`. Both "
             f"read one v5e-16 host's {rows_per_host} rows of each global batch of {need['global_batch']} x "
             f"{need['seq_len']} (concat packing) from the same store, in the same global shuffle (grain's "
             f"index_shuffle, which lmjax's reader calls per row): the digest of the first {DIGEST_BATCHES} batches "
             f"is the same for every reader of a store. Each reader runs in its own process for "
             f"{_READ_SECONDS.value:.0f} s after those batches; peak RSS is the process's `ru_maxrss`. The sparse "
             "store is the gpt2 store's index scaled to gpt_1b's 26B tokens in sparse shard files (zeros, no disk "
             "space): it measures what the reader holds at that corpus size.", "",
             "| store | rows/epoch | reader | startup | batches/s | tokens/s | x consumption | peak RSS | digest |",
             "|---|---|---|---|---|---|---|---|---|"]
    try:
        for name, directory in stores:
            for reader, (child, *extra) in readers:
                r = run_child(child, directory, str(need["global_batch"]), str(rows_per_host),
                              str(_READ_SECONDS.value), *extra)
                print(f"{name}: {reader} {r}", flush=True)
                rows_of[name] = r["rows_per_epoch"]
                lines.append(f"| {name} | {r['rows_per_epoch']:,} | {reader} | {r['startup_seconds']:.1f} s | "
                             f"{r['batches_per_second']:,.0f} | {r['tokens_per_second'] / 1e6:.1f}M | "
                             f"{r['tokens_per_second'] / need['tokens_per_second_per_host']:.1f} | "
                             f"{r['peak_rss'] / 2**30:.2f} GiB | `{r['digest']}` |")
        small_rows = rows_of[stores[0][0]]
        held = [run_child("held_permutation", str(rows)) for rows in (small_rows, rows_of[stores[-1][0]])]
        lines += ["", "The former shuffle held a drawn permutation of all rows per epoch (two epochs at an epoch's end):",
                  "", "| rows/epoch | resident memory it holds |", "|---|---|"]
        lines += [f"| {h['rows']:,} | {h['added'] / 2**20:.0f} MiB |" for h in held]
        small = stores[0][1]
        lines += ["", f"A store behind a URL with {_LATENCY_MS.value:g} ms per request (`slowfile://`: the "
                  f"{stores[0][0]} store, every ranged read delayed, as a bucket's requests are): lmjax's reader "
                  f"makes one request per row, so `data.prefetch_threads` decides how many are in flight.", "",
                  "| prefetch threads | batches/s | tokens/s | x consumption | digest |", "|---|---|---|---|---|"]
        for threads in (0, 16, 64):
            r = run_child("read_slow", small, str(need["global_batch"]), str(rows_per_host),
                          str(_READ_SECONDS.value), str(threads), str(_LATENCY_MS.value))
            print(f"slow store, {threads} threads: {r}", flush=True)
            lines.append(f"| {threads} | {r['batches_per_second']:,.1f} | {r['tokens_per_second'] / 1e6:.2f}M | "
                         f"{r['tokens_per_second'] / need['tokens_per_second_per_host']:.2f} | `{r['digest']}` |")
    finally:
        import shutil

        shutil.rmtree(virtual, ignore_errors=True)
    lines += ["", f"5-minute load average of the shared machine: {load_before:.1f} at the start, "
              f"{os.getloadavg()[1]:.1f} at the end (on {os.cpu_count()} cores)."]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(_RESULTS.value) as f:
        previous = f.read().split("\n## Readers")[0].rstrip("\n") + "\n"
    with open(_RESULTS.value, "w") as f:
        f.write(previous + text)


def measure_in_memory(config) -> None:
    from lmjax.data import build_tokenizer, make_pipeline, sources
    from lmjax.data.pipeline import tokenize_split

    data_cfg = config.data
    with tempfile.TemporaryDirectory() as cache:
        data_cfg.cache_dir = cache
        print(f"source: {sources.describe(data_cfg)}  tokenizer: {data_cfg.tokenizer} "
              f"vocab {data_cfg.vocab_size}  seq_len {data_cfg.seq_len}  "
              f"batch {config.train.batch_size}  packing {data_cfg.packing}")
        start = time.perf_counter()
        tokenizer = build_tokenizer(data_cfg)
        print(f"one-time: tokenizer training {time.perf_counter() - start:.2f}s "
              f"(reading the source included; vocab {tokenizer.vocab_size})")
        for split in sources.SPLITS:
            start = time.perf_counter()
            data = tokenize_split(data_cfg, split, tokenizer)
            seconds = time.perf_counter() - start
            print(f"one-time: tokenizing {split}: {seconds:.2f}s for {len(data['doc_ends'])} docs, "
                  f"{int(data['num_bytes']) / 1e6:.2f} MB -> {len(data['tokens'])} tokens "
                  f"({int(data['num_bytes']) / len(data['tokens']):.3f} bytes/token)")
        start = time.perf_counter()
        pipeline = make_pipeline(data_cfg, tokenizer, "train", config.train.batch_size)
        print(f"make_pipeline from the caches: {time.perf_counter() - start:.3f}s")
        next(pipeline)
        tokens = 0
        start = time.perf_counter()
        for _ in range(_BATCHES.value):
            tokens += next(pipeline)["inputs"].size
        seconds = time.perf_counter() - start
        print(f"pipeline: {_BATCHES.value} batches of {config.train.batch_size}x{data_cfg.seq_len} "
              f"in {seconds:.3f}s = {tokens / seconds:,.0f} tokens/s "
              f"({seconds / _BATCHES.value * 1e6:.0f} us/batch)")


def main(argv) -> None:
    del argv
    if _CHILD.value == "prepare":
        print(json.dumps(child_prepare(*_ARGS.value)))
    elif _CHILD.value == "read":
        print(json.dumps(child_read(*_ARGS.value)))
    elif _CHILD.value == "read_lmjax":
        print(json.dumps(child_read_lmjax(*_ARGS.value)))
    elif _CHILD.value == "read_grain":
        print(json.dumps(child_read_grain(*_ARGS.value)))
    elif _CHILD.value == "read_slow":
        print(json.dumps(child_read_slow(*_ARGS.value)))
    elif _CHILD.value == "held_permutation":
        print(json.dumps(child_held_permutation(*_ARGS.value)))
    elif _READERS.value:
        cli.run(measure_readers)
    elif _CONFIG.value is not None:
        cli.run(lambda: measure_in_memory(_CONFIG.value))
    else:
        cli.run(measure_store)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
