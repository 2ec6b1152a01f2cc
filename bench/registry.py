"""Benchmark the model registry end to end: big transfers, hub memory, list latency.

Run from the repository root (takes a minute or two on an idle machine; a quick run a few seconds):

    .venv/bin/python bench/registry.py                                # 500 MB, 2000 versions
    .venv/bin/python bench/registry.py --size-mb 50 --versions 200    # quick run

Everything runs on loopback against a real `edgefleet hub serve` process
(bench/harness.py) in a temporary directory that is removed at the end. The
table goes to stdout, progress to stderr.

What is measured, and how to read it:

* upload / download MB/s: a --size-mb file of random bytes moved by the real
  CLI (`edgefleet model register` / `edgefleet model download` as
  subprocesses, each command timed whole, start-up included) and checked by
  sha256 afterwards. The baseline (bench/plain_http.py) moves the same bytes
  in the same run through a stdlib ThreadingHTTPServer and an http.client
  client run as a process too (so both pay an interpreter's start-up), in
  1 MiB pieces. Its upload is timed twice: with the server fsyncing the file
  before it answers, as the hub must before it acknowledges a blob (the
  ratio to judge), and left in the page cache (shown for comparison). Each
  of --rounds rounds runs the five transfers in turn; the table shows the
  median and the range. The ratio is edgefleet/baseline: 1.0 means the
  registry moves bytes as fast as plain HTTP. The baseline does no hashing
  and no auth, so it is an upper bound. The CLI's own start-up (imports,
  config, ~0.2 CPU-s) dominates small files: use the default 500 MB to judge
  throughput, the quick run only to check that everything works. On virtual
  machines writing fresh page cache and flushing it are erratic, so the
  baseline's range is wide.
* hub peak RSS: the hub process's resident memory, sampled every 25 ms during
  the CLI uploads (and downloads), against its idle RSS before the first one.
  Target: under 150 MB whatever the file size, i.e. the hub streams.
* list latency: with --versions versions of one model registered through the
  REST API (the rate is shown too), median / p95 of --requests GETs per
  endpoint. The baseline is GET /api/v1/health on the same keep-alive
  connection, requested in turn with the lists: the cost of one round trip
  through the hub's HTTP stack, so the ratio says how many of those a list costs.
* CLI list: `edgefleet model list NAME --json` timed once. It is mostly Python
  start-up and imports, so its baseline is `edgefleet --version`.

Measured on the 2-core build machine while other sessions' benchmarks loaded
it (load 14-19), 500 MB, medians of 3 rounds, three runs taking turns with
three of the code before: upload 0.66x / 0.63x / 0.55x of the fsynced
baseline (CLI 193 / 133 / 175 MB/s), before 0.85x / 0.40x / 0.56x (110 /
165 / 129 MB/s): the baseline swung from 103 to 592 MB/s, so at such loads
its ratio says little. A hub of each kind, CLI uploads alternating six
times, twice: 119 and 130 MB/s before, 170 and 162 after (the baseline's
medians 346 and 384: 0.49x and 0.42x). On a quiet machine (load under 2) the
code before ran at 0.32x (243 MB/s against 753). What changed: the blob
store hashes each chunk in a thread of its own while another writes it
(hashlib and write both release the GIL), so the hub's two 0.3 CPU-s
passes run side by side. CPU time per 500 MB upload is steadier than the
wall clock at such loads: the baseline costs ~0.5 CPU-s (server 0.2-0.3,
all in the kernel; client 0.2 with its interpreter's start-up); edgefleet
~2: the CLI 0.6-0.75 (start-up 0.2, SHA-256 0.3, reading and sending the
rest), the hub 1-2 (perf: SHA-256 0.27; the page-cache write 0.06-0.32,
the spread from one run to the next being the virtual machine's; page
faults of fresh buffers ~0.14; Python and uvicorn's body handling ~0.25:
it reads 256 KiB at a time, copies each body chunk three times and pauses
and resumes reading on each). Tried and dropped, no gain that three or four
alternating turns could see: 4 MiB pieces, a deeper queue to a writer
thread of the upload's own, hashing and writing in the event loop itself
(slower: one thread gets less of a busy machine), a 4 MiB SO_RCVBUF,
uvloop, uvicorn's protocol subclassed to pause reading only past 1 MiB of
unread body (its epoll register/unregister per pause and resume are ~7 % of
the event loop's py-spy samples), the CLI hashing in a thread while it
sends. Now the hub's busiest thread is its event loop (about half of the
upload's time in py-spy: the socket reads, uvicorn's parsing and copies,
those epoll calls), and the CLI spends most of its time in send(), waiting
for the hub. The 0.8x target is not
met: on two cores the floor is the ~2 CPU-s spread over both, against a
baseline bound by the disk (dd with fdatasync wrote 94-364 MB/s here, and
the baseline up to 753 MB/s on a quiet machine).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from rich.console import Console

import plain_http
from harness import EDGEFLEET, HubProcess, start_hub
from report import Row, print_table

CHUNK = 1 << 20
MB = 1_000_000
RSS_TARGET_MB = 150.0
SAMPLE_EVERY_S = 0.025
COMMAND_TIMEOUT_S = 900
TRANSFER_MODEL = "bench"
LIST_MODEL = "bench-list"
TAG_FILTER = "stage=prod"

console = Console(stderr=True)




# ---- helpers ---------------------------------------------------------------


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def write_random_file(path: Path, size: int) -> str:
    """Write SIZE random bytes in 1 MiB pieces; returns their sha256."""
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            f.write(chunk)
            sha.update(chunk)
            left -= len(chunk)
    return sha.hexdigest()


def timed(fn: Callable[[], object]) -> float:
    # Flush earlier phases' dirty pages so their write-back is not billed to FN.
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def mb_per_s(size: int, seconds: float) -> float:
    return size / MB / seconds


def percentile(samples: list[float], pct: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x"


def spread(samples: list[float]) -> str:
    """Median / p95 in milliseconds."""
    return f"{statistics.median(samples) * 1000:.1f} / {percentile(samples, 95) * 1000:.1f} ms"


def spread_ratio(samples: list[float], baseline: list[float]) -> str:
    median = statistics.median(samples) / statistics.median(baseline)
    return f"{median:.1f}x / {percentile(samples, 95) / percentile(baseline, 95):.1f}x"


# ---- the hub and its CLI ---------------------------------------------------


class RssSampler:
    """Polls a process's RSS in a thread and keeps the peak."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0

    def rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def cli_env(hub: HubProcess, scratch: Path) -> dict[str, str]:
    # A config file from the user's own `edgefleet login` must not be read.
    return {
        **os.environ,
        "EDGEFLEET_HUB": hub.url,
        "EDGEFLEET_TOKEN": hub.admin_token,
        "EDGEFLEET_CONFIG": str(scratch / "no-config.json"),
    }


def run_command(command: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")


def run_cli(args: list[str], env: dict[str, str]) -> None:
    run_command([*EDGEFLEET, *args], env)


def hub_client(hub: HubProcess) -> httpx.Client:
    return httpx.Client(
        base_url=hub.url,
        headers={"Authorization": f"Bearer {hub.admin_token}"},
        timeout=httpx.Timeout(60.0),
        limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
    )


def register_versions(client: httpx.Client, count: int, threads: int = 4) -> None:
    """COUNT versions of LIST_MODEL sharing one tiny blob; one in ten tagged stage=prod."""
    blob = client.post("/api/v1/blobs", content=b"edgefleet bench\n")
    blob.raise_for_status()
    digest = blob.json()["digest"]

    def register(i: int) -> None:
        client.post(
            f"/api/v1/models/{LIST_MODEL}/versions",
            json={
                "files": [{"path": "model.bin", "digest": digest}],
                "tags": {"stage": "prod" if i % 10 == 0 else "dev", "shard": str(i % 4)},
            },
        ).raise_for_status()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(register, range(count)))


def latencies(
    client: httpx.Client, endpoints: dict[str, tuple[str, dict[str, str | int]]], n: int
) -> dict[str, list[float]]:
    """N timed GETs of each endpoint, taken in turns so that all see the same conditions."""
    for path, params in endpoints.values():
        client.get(path, params=params).raise_for_status()  # warm caches and the connection
    samples: dict[str, list[float]] = {label: [] for label in endpoints}
    for _ in range(n):
        for label, (path, params) in endpoints.items():
            start = time.perf_counter()
            client.get(path, params=params).raise_for_status()
            samples[label].append(time.perf_counter() - start)
    return samples


# ---- the phases ------------------------------------------------------------


@dataclass
class Transfers:
    """Seconds per round for each way of moving the file, and the hub's RSS."""

    size: int
    idle_rss: int
    base_up: list[float] = field(default_factory=list)  # the server fsyncs, as the hub does
    base_up_cached: list[float] = field(default_factory=list)  # left in the page cache
    cli_up: list[float] = field(default_factory=list)
    base_down: list[float] = field(default_factory=list)
    cli_down: list[float] = field(default_factory=list)
    upload_peak_rss: int = 0
    download_peak_rss: int = 0


def check_copy(path: Path, digest: str, what: str) -> None:
    if sha256_of(path) != digest:
        raise RuntimeError(f"{what}: the downloaded bytes differ from the file sent")


def bench_transfers(
    hub: HubProcess, base_port: int, source: Path, digest: str, scratch: Path, rounds: int
) -> Transfers:
    """Each round: baseline uploads (fsynced, then not), CLI upload, baseline download,
    CLI download.

    Interleaving puts the baseline and the hub under the same disk and page
    cache conditions, which drift a lot from one transfer to the next.
    """
    env = cli_env(hub, scratch)
    pid = hub.process.pid
    result = Transfers(source.stat().st_size, RssSampler(pid).rss())
    fetched, out = scratch / "baseline-download", scratch / "cli-download"
    register = ["model", "register", str(source), "--name", TRANSFER_MODEL, "--quiet",
                "--allow-non-model"]  # random bytes, not a model
    download = ["model", "download", f"{TRANSFER_MODEL}:1", "--out", str(out), "--quiet"]
    for _ in range(rounds):
        result.base_up_cached.append(timed(lambda: run_command(
            plain_http.client_command("put", str(base_port), str(source)))))
        result.base_up.append(timed(lambda: run_command(
            plain_http.client_command("put", str(base_port), str(source), "--fsync"))))
        with RssSampler(pid) as rss:
            result.cli_up.append(timed(lambda: run_cli(register, env)))
        result.upload_peak_rss = max(result.upload_peak_rss, rss.peak)

        result.base_down.append(timed(lambda: run_command(
            plain_http.client_command("get", str(base_port), source.name, str(fetched)))))
        check_copy(fetched, digest, "baseline")
        fetched.unlink()
        with RssSampler(pid) as rss:
            result.cli_down.append(timed(lambda: run_cli(download, env)))
        result.download_peak_rss = max(result.download_peak_rss, rss.peak)
        check_copy(out / source.name, digest, "edgefleet model download")
        shutil.rmtree(out)
    return result


def bench_lists(hub: HubProcess, versions: int, requests: int, scratch: Path) -> list[Row]:
    versions_path = f"/api/v1/models/{LIST_MODEL}/versions"
    endpoints: dict[str, tuple[str, dict[str, str | int]]] = {
        "health": ("/api/v1/health", {}),
        f"list 100 of {versions} versions": (versions_path, {"limit": 100}),
        f"list versions tag={TAG_FILTER}": (versions_path, {"tag": TAG_FILTER, "limit": 100}),
        "list models": ("/api/v1/models", {}),
    }
    with hub_client(hub) as client:
        register_s = timed(lambda: register_versions(client, versions))
        samples = latencies(client, endpoints, requests)
    env = cli_env(hub, scratch)
    cli_list = timed(lambda: run_cli(["model", "list", LIST_MODEL, "--json"], env))
    cli_start = timed(lambda: run_cli(["--version"], env))

    floor = samples.pop("health")
    rows = [Row(f"register {versions} versions (REST, 4 threads)",
                f"{versions / register_s:.0f} versions/s", verdict=f"{register_s:.1f} s total")]
    for label, times in samples.items():
        rows.append(
            Row(label, spread(times), f"health {spread(floor)}", spread_ratio(times, floor))
        )
    rows.append(Row("CLI model list --json (start-up bound)", ms(cli_list),
                    f"--version {ms(cli_start)}", ratio(cli_list, cli_start)))
    return rows


def throughput(size: int, seconds: list[float]) -> tuple[float, str]:
    """Median MB/s over the rounds, and that median shown with the range."""
    rates = [mb_per_s(size, s) for s in seconds]
    median = statistics.median(rates)
    if len(rates) == 1:
        return median, f"{median:.0f} MB/s"
    return median, f"{median:.0f} MB/s ({min(rates):.0f}-{max(rates):.0f})"


def transfer_rows(t: Transfers) -> list[Row]:
    def speed_row(label: str, measured: list[float], baseline: list[float]) -> Row:
        value, value_text = throughput(t.size, measured)
        base, base_text = throughput(t.size, baseline)
        return Row(label, value_text, base_text, ratio(value, base))

    def rss_row(label: str, peak: int) -> Row:
        verdict = "ok" if peak / MB < RSS_TARGET_MB else "OVER"
        return Row(label, f"{peak / MB:.0f} MB", f"idle {t.idle_rss / MB:.0f} MB",
                   f"{verdict} < {RSS_TARGET_MB:.0f} MB")

    size_mb = t.size // MB
    return [
        speed_row(f"upload {size_mb} MB (CLI register)", t.cli_up, t.base_up),
        speed_row(f"upload {size_mb} MB, baseline not fsynced", t.cli_up, t.base_up_cached),
        speed_row(f"download {size_mb} MB (CLI download)", t.cli_down, t.base_down),
        rss_row("hub peak RSS, upload", t.upload_peak_rss),
        rss_row("hub peak RSS, download", t.download_peak_rss),
    ]




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=500, help="model file size (default 500)")
    parser.add_argument("--versions", type=int, default=2000,
                        help="versions registered for the list benchmark (default 2000)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="transfers of each kind; the median is reported (default 5)")
    parser.add_argument("--requests", type=int, default=50,
                        help="timed requests per list endpoint (default 50)")
    args = parser.parse_args()
    if min(args.size_mb, args.versions, args.rounds) < 1 or args.requests < 2:
        parser.error("--size-mb, --versions and --rounds must be at least 1, --requests at least 2")

    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        scratch = Path(tmp)
        source = scratch / "model.bin"
        console.log(f"writing {args.size_mb} MB of random bytes")
        digest = write_random_file(source, args.size_mb * MB)
        served = scratch / "served"
        served.mkdir()
        hub = start_hub(scratch / "hub", tls=False)  # bench/tls.py measures TLS
        try:
            with plain_http.server(served) as base_port:
                console.log(f"{args.rounds} rounds of uploads and downloads, baseline and CLI")
                transfers = bench_transfers(hub, base_port, source, digest, scratch, args.rounds)
            console.log(f"registering {args.versions} versions, timing lists")
            list_rows = bench_lists(hub, args.versions, args.requests, scratch)
        finally:
            hub.stop()
    print_table(
        transfer_rows(transfers) + list_rows,
        f"edgefleet registry bench: --size-mb {args.size_mb} --versions {args.versions} "
        f"--rounds {args.rounds}, {os.cpu_count()} CPUs",
    )


if __name__ == "__main__":
    main()
