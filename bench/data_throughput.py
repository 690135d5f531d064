"""Data throughput: the streaming reader (local disk and moto S3) against the decode bound, and the
shard writer. Prints one JSON object.

    python bench/data_throughput.py [--samples 2000] [--epochs 3] [--resolution 256] [--workers 2] [--runs 3]

- source: synthetic JPEGs (noise + gradients + blocks, varied sizes) with captions in a folder;
- `shard`: `data_tools.shard.shard_dataset("folder:...")` into 256px JPEG shards, images/s; if that
  module is missing or fails, `shard_error` says why and `write_shards` here builds the dataset;
- `reader_local` / `reader_s3`: samples/s through one `StreamingReader` with `--workers` DataLoader
  workers for `--epochs` epochs, from the local shards and from moto's S3 server, started here as its
  own process on 127.0.0.1;
- `decode_bound`: the same samples' bytes, `--epochs` times over, decoded and resized by
  `samples.decode_image` in a tight loop by a `multiprocessing.Pool` of `--workers` processes, in
  chunks of one batch.
Rates are steady state: counted from the first batch (or chunk) on; the time to it is reported as
`seconds_to_first_batch` (worker start-up and the first shuffle window's read). Each figure is the
median of `--runs` interleaved runs; the ratios of each round are listed too (`*_per_run`).
`cpu_ms_per_sample` over the same span (this process, the workers, and the S3 server process; from
/proc) is reported too: unlike samples/s it is robust to other load on a shared machine.
`batch_slots_per_worker`: the shared-memory batch slots each reader worker had made by its last batch
(the loop holds one batch at a time, as a trainer does). Targets: reader >= 0.85 of the bound, S3 >=
0.90 of local.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port  # noqa: E402

from data_tools import plan, schema  # noqa: E402
from data_tools.reader import ReaderConfig, StreamingReader  # noqa: E402
from data_tools.samples import decode_image  # noqa: E402

try:
    from data_tools.shard import shard_dataset
except ImportError:  # the shard writer is developed separately; the reader bench does not need it
    shard_dataset = None

_POOL_SAMPLES: list[bytes] = []  # inherited by forked pool workers


def make_source(folder: str, count: int, seed: int = 0) -> None:
    """`count` varied synthetic JPEGs (288..480 px sides) with captions, as a folder: source."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        w, h = (int(v) for v in rng.integers(288, 481, 2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * rng.uniform(60, 200, 3)
        img = base + rng.normal(0, rng.uniform(5, 40), (h, w, 3))
        for _ in range(4):  # a few flat blocks so the images are not pure noise
            x0, y0 = int(rng.integers(0, w - 32)), int(rng.integers(0, h - 32))
            img[y0 : y0 + int(rng.integers(16, 96)), x0 : x0 + int(rng.integers(16, 96))] = rng.uniform(0, 255, 3)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
        with open(os.path.join(folder, f"{i:06d}.txt"), "w") as f:
            f.write(f"synthetic image number {i}")


def time_shard(source: str, out: str, resolution: int, workers: int, count: int) -> float:
    start = time.perf_counter()
    shard_dataset(f"folder:{source}", out, resolution=resolution, samples_per_shard=250, workers=workers,
                  progress=False, overwrite=os.path.exists(out))
    return count / (time.perf_counter() - start)


def _children_cpu() -> float:
    """CPU seconds of this process's live children (DataLoader or pool workers, the S3 server), from /proc."""
    return sum(_proc_cpu(int(pid)) for pid in _children())


def _children() -> list[str]:
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:  # a thread may end between the listing and the read
            with open(f"/proc/self/task/{task}/children") as f:
                pids += f.read().split()
        except FileNotFoundError:
            continue
    return pids


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:  # ended meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class CpuMeter:
    """CPU seconds spent from construction to `per_sample()`: by this process, by its live children
    other than the S3 server (the workers), and by the S3 server process."""

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid
        self.start = self._now()

    def _now(self) -> tuple[float, float, float]:
        server = _proc_cpu(self.server_pid) if self.server_pid else 0.0
        return time.process_time(), _children_cpu() - server, server

    def per_sample(self, count: int) -> dict:
        now = self._now()
        parts = {name: round(1000 * (b - a) / count, 3) for name, a, b in zip(("main", "workers", "s3_server"), self.start, now)}
        return parts if self.server_pid else {k: v for k, v in parts.items() if k != "s3_server"}


def time_reader(url: str, resolution: int, workers: int, batch: int, epochs: int,
                server_pid: int | None = None) -> tuple[float, float, dict, dict]:
    """(samples/s, seconds to the first batch, CPU ms/sample, batch slots per worker) of `epochs` epochs
    through one reader. Rate and CPU count from the first batch on: steady state, with start-up as its
    own figure."""
    cfg = ReaderConfig(urls=[url], resolution=resolution, batch_size=batch, num_workers=workers, seed=0)
    reader = StreamingReader(cfg)
    steps = epochs * plan.num_steps(reader.num_samples, 1, batch)
    begin = time.perf_counter()
    batches = iter(reader)
    first = len(next(batches)["key"])
    start, cpu = time.perf_counter(), CpuMeter(server_pid)
    count = sum(len(b["key"]) for b in itertools.islice(batches, steps - 1))
    elapsed = time.perf_counter() - start
    cpu_per_sample, slots = cpu.per_sample(count), reader.batch_slots()
    reader.close()
    assert first + count == epochs * reader.num_samples, (first + count, reader.num_samples)
    return count / elapsed, start - begin, cpu_per_sample, slots


def _decode_range(args: tuple[int, int, int]) -> int:
    lo, hi, resolution = args
    for data in _POOL_SAMPLES[lo:hi]:
        decode_image(data, resolution)
    return hi - lo


def time_decode_bound(dataset: str, resolution: int, workers: int, epochs: int) -> tuple[float, float, dict, dict]:
    """(samples/s, seconds to the first chunk, CPU ms/sample) of the pool, counted as `time_reader`."""
    global _POOL_SAMPLES
    _POOL_SAMPLES = [data for path in sorted(os.listdir(dataset)) if path.endswith(".tar")
                     for data in _image_bytes(os.path.join(dataset, path))]
    n = len(_POOL_SAMPLES)
    chunks = [(lo, min(lo + 32, n), resolution) for lo in range(0, n, 32)] * epochs  # a reader batch each
    begin = time.perf_counter()
    pool = mp.get_context("fork").Pool(workers)
    results = pool.imap_unordered(_decode_range, chunks)
    first = next(results)
    start, cpu = time.perf_counter(), CpuMeter(None)
    count = sum(results)
    elapsed = time.perf_counter() - start
    cpu_per_sample = cpu.per_sample(count)
    pool.close()
    pool.join()
    assert first + count == epochs * n
    return count / elapsed, start - begin, cpu_per_sample, {}


def _image_bytes(path: str) -> list[bytes]:
    with tarfile.open(path) as tf:
        return [tf.extractfile(m).read() for m in tf if schema.split_key(m.name)[1] in schema.IMAGE_EXTS]


def write_shards(source: str, out: str, resolution: int, samples_per_shard: int = 250) -> None:
    """Fallback writer (schema-conforming tars + manifest) for when `data_tools.shard` is unusable."""
    import hashlib
    import io

    names = sorted(n for n in os.listdir(source) if n.endswith(".jpg"))
    os.makedirs(out, exist_ok=True)
    infos = []
    for index in range(0, -(-len(names) // samples_per_shard)):
        path = os.path.join(out, schema.shard_name(index))
        with tarfile.open(path, "w") as tf:
            for i, name in enumerate(names[index * samples_per_shard : (index + 1) * samples_per_shard]):
                with open(os.path.join(source, name), "rb") as f:
                    pixels = decode_image(f.read(), resolution)
                jpg = io.BytesIO()
                Image.fromarray(pixels).save(jpg, format="JPEG", quality=95)
                caption = open(os.path.join(source, name[:-4] + ".txt"), "rb").read()
                key = schema.sample_key(index, i)
                for ext, data in (("jpg", jpg.getvalue()), ("txt", caption), ("json", b"{}")):
                    member = tarfile.TarInfo(f"{key}.{ext}")
                    member.size = len(data)
                    tf.addfile(member, io.BytesIO(data))
        data = open(path, "rb").read()
        count = len(names[index * samples_per_shard : (index + 1) * samples_per_shard])
        infos.append(schema.ShardInfo(schema.shard_name(index), count, len(data), hashlib.sha256(data).hexdigest()))
    with open(os.path.join(out, schema.MANIFEST_NAME), "w") as f:
        f.write(schema.Manifest(schema.SCHEMA_VERSION, infos).to_json())


def build_dataset(tmp: str, samples: int, resolution: int, workers: int, runs: int) -> tuple[str, dict]:
    """The bench dataset, sharded by `data_tools.shard` when it works (timed), else by `write_shards`."""
    source, out = os.path.join(tmp, "source"), os.path.join(tmp, "shards")
    make_source(source, samples)
    if shard_dataset is None:
        write_shards(source, out, resolution)
        return out, {"shard_images_per_s": None, "shard_error": "data_tools.shard not importable"}
    try:
        rates = [time_shard(source, out, resolution, workers, samples) for _ in range(runs)]
    except Exception as e:  # noqa: BLE001 - another module's failure is reported, not fatal to the bench
        fallback = os.path.join(tmp, "shards-fallback")
        write_shards(source, fallback, resolution)
        return fallback, {"shard_images_per_s": None, "shard_error": f"{type(e).__name__}: {e}"}
    return out, {"shard_images_per_s": round(statistics.median(rates), 1)}


def start_s3_server(local: str) -> tuple[subprocess.Popen, str]:
    """moto's S3 server as its own process on 127.0.0.1 (as a real S3 endpoint is another process, not
    threads sharing the reader's interpreter), holding a copy of the shards at s3://bench/shards."""
    import fsspec

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "import sys; from moto.server import main; main(sys.argv[1:])",
                               "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("bench")
    for name in sorted(os.listdir(local)):
        if not name.startswith("."):
            fs.put_file(os.path.join(local, name), f"bench/shards/{name}")
    return server, "s3://bench/shards"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per timed reader run (one start-up)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        dataset, shard_result = build_dataset(tmp, args.samples, args.resolution, args.workers, args.runs)
        server, s3_url = start_s3_server(dataset)
        runs: dict[str, list[tuple[float, float, dict, dict]]] = {"bound": [], "local": [], "s3": []}
        try:
            for _ in range(args.runs):  # interleaved, so drifting machine load hits all three alike
                runs["bound"].append(time_decode_bound(dataset, args.resolution, args.workers, args.epochs))
                runs["local"].append(time_reader(dataset, args.resolution, args.workers, args.batch, args.epochs))
                runs["s3"].append(time_reader(s3_url, args.resolution, args.workers, args.batch, args.epochs,
                                              server.pid))
        finally:
            server.kill()
            server.wait()
    rate = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    startup = {k: round(statistics.median(r[1] for r in v), 3) for k, v in runs.items()}
    cpu = {k: {part: statistics.median(r[2][part] for r in v) for part in v[0][2]} for k, v in runs.items()}
    slots = {k: max(n for r in runs[k] for n in r[3].values()) for k in ("local", "s3")}
    bound, local, remote = rate["bound"], rate["local"], rate["s3"]
    result = {
        "samples": args.samples, "epochs": args.epochs, "resolution": args.resolution, "workers": args.workers, "batch": args.batch,
        "runs": args.runs, "cpus": os.cpu_count(),
        **shard_result,
        "decode_bound_samples_per_s": round(bound, 1),
        "reader_local_samples_per_s": round(local, 1),
        "reader_s3_samples_per_s": round(remote, 1),
        "reader_over_decode_bound": round(local / bound, 3),
        "s3_over_local": round(remote / local, 3),
        # the same ratios round by round (each round runs the three back to back): the spread shows how
        # much of a miss or a pass is the machine
        "reader_over_decode_bound_per_run": [round(a[0] / b[0], 3) for a, b in zip(runs["local"], runs["bound"])],
        "s3_over_local_per_run": [round(a[0] / b[0], 3) for a, b in zip(runs["s3"], runs["local"])],
        "seconds_to_first_batch": startup,
        "cpu_ms_per_sample": cpu,  # robust to other load on a shared machine
        "batch_slots_per_worker": slots,  # the most any worker made in any run
        "load_average_1min": round(os.getloadavg()[0], 2),
        "targets": {"reader_over_decode_bound": 0.85, "s3_over_local": 0.90},
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
