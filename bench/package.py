"""Benchmark model packages: build time, the hub's disk use, and what a device fetches per update.

Run from the repository root (about 20 s on 2 cores; --with-deps adds
half a minute or more, depending on the network to PyPI):

    .venv/bin/python bench/package.py                  # 100 MB model
    .venv/bin/python bench/package.py --size-mb 20     # quick run
    .venv/bin/python bench/package.py --with-deps      # also builds with the runtime's wheels

Everything runs on loopback against a real `edgefleet hub serve` process
(bench/harness.py) in a temporary directory that is removed at the end. The
table goes to stdout, progress to stderr.

The model is a real ONNX file (one MatMul whose float32 weights, from a
seeded RNG, make it --size-mb MB), registered through the CLI as version 1.
Version 2 has the same architecture and size but other weights; version 3
registers version 2's file again and is built with a different --prefer, so
only its serving options differ.

What is measured, and how to read it:

* build: packaging version 1 for linux/amd64, linux/arm64 and linux/arm/v7.
  "in-process" is the `build_package` call alone (deps=None), i.e. the
  packaging cost. "CLI --out" is `edgefleet package build --no-deps --out`
  timed whole as a subprocess: packaging plus CLI start-up plus downloading
  the model from the hub; the row after it is the difference. "pushed" is
  the default CLI build (push to the hub's registry, then the hub signs it),
  timed once per version since a second push of the same blobs skips them.
  The baseline is `tar -cf` of the model file and a tiny serving.json run
  three times (once per platform, the naive way to package), timed as a
  subprocess in the same run; the ratio is build/baseline. Below 1.0 means
  the build beats copying the model three times (it writes the model layer
  once). The median of --rounds rounds is shown with its range.
  With --with-deps, `--image --out` builds of runnable images (pip downloads
  wheels for each platform; arm/v7 has no onnxruntime wheel, and a platform
  whose Debian base this machine cannot build (no qemu) is unavailable, so
  --skip-unavailable leaves them out; mmdebstrap builds the base), first
  with an empty cache (cold; a temporary one, your own ~/.cache is not
  touched), then again (warm: wheels, base and deps layers all cached); the
  baseline is the native CLI build.
* hub disk: growth of the hub's blob directory (data_dir/blobs) across each
  pushed build. The baseline is the model size x 3, what storing the model
  once per platform would cost; the ratio is growth / model size, so about
  1.0x means the model layer is stored once for all three platforms, and
  about 0.0x for version 3 means its model layer was already there.
  "hub disk total" is the whole blob directory after the first push: the
  registered model file and the model layer (a tar wrapping it) have
  different digests, so the hub holds the model's bytes twice (2.0x).
* fetch: bytes a linux/arm64 device downloads from the hub's registry
  (`pull_to_layout` into one local OCI layout that keeps what earlier
  versions brought, counted on the wire: manifests, configs and blobs).
  Native mode takes only the model and serving layers (plus the hub's
  signature); container mode takes every layer. The container packages are
  built in-process with a stand-in deps layer (random-byte files shaped like
  a Python package, different per platform, in place of pip's wheels) and
  pushed unsigned to a separate repository. The baseline is the model file
  size; the ratio is fetched / model size: about 1.0x for an update where
  the weights changed (only the new model layer and small JSON move; the
  deps layer is reused), about 0.00x when only serving options changed.
  The comment breaks the bytes down by layer role ("manifests" being the
  index, the platform's manifest and its config) and names the layers the
  device already had and did not fetch again.

A comment saying UNEXPECTED marks a number that contradicts the
design (a model layer stored or fetched more than once, a reused layer
fetched again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from contract.layers import DEPS, MODEL, ROLE, SERVING
from contract.oci import Descriptor, OCILayout, Platform, parse_index, parse_manifest
from harness import EDGEFLEET, HubProcess, start_hub
from packager.build import DEFAULT_PLATFORMS, build_package
from packager.deps import DepsProvider
from packager.distribution import Registry, pull_signature, pull_to_layout, push_layout
from packager.modelfile import ModelInfo, inspect_model
from registry import cli_env
from report import Row, print_table

MB = 1_000_000
MODEL_NAME = "bench-package"
MODEL_FILE = "model.onnx"
CONTAINER_REPO = "bench/container"
DEVICE_PLATFORM = "linux/arm64"
PREFER = "onnxruntime:CPU"
INPUT_FEATURES = 1024
ONNX_OPSET = 17
ONNX_IR_VERSION = 8
# Protobuf refuses messages of 2 GiB and more; the weights are all of the file.
MAX_SIZE_MB = 2000
STAND_IN_DEPS_MB = 5
JSON_PART = "manifests"
SIGNATURE_PART = "signature"
COMMAND_TIMEOUT_S = 1800
# Manifests, configs, serving layers and signatures are kilobytes: anything
# this much above the expected layers means something was fetched twice.
SMALL_BYTES = MB

T = TypeVar("T")
console = Console(stderr=True)


@dataclass(frozen=True)
class Update:
    """A model version as the benchmark registers it, and whether its model files are new."""

    version: int
    label: str
    model_changed: bool


UPDATES = (
    Update(1, "first", True),
    Update(2, "new weights", True),
    Update(3, "serving only", False),
)


# ---- helpers ---------------------------------------------------------------


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    # Flush earlier phases' dirty pages so their write-back is not billed to FN.
    os.sync()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def cli_json(args: Sequence[str], env: dict[str, str]) -> Any:
    return json.loads(run([*EDGEFLEET, *args, "--json"], env))


def size_text(n: float) -> str:
    if abs(n) >= MB:
        return f"{n / MB:.1f} MB"
    if abs(n) >= 1000:
        return f"{n / 1000:.1f} kB"
    return f"{n:.0f} B"


def seconds_text(samples: list[float]) -> str:
    median = statistics.median(samples)
    if len(samples) == 1:
        return f"{median:.2f} s"
    return f"{median:.2f} s ({min(samples):.2f}-{max(samples):.2f})"


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x"


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


# ---- inputs: models and the stand-in deps ----------------------------------


def write_onnx_model(path: Path, size: int, seed: int) -> None:
    """y = x @ W, x being [batch, INPUT_FEATURES]; W's float32 values make the file ~SIZE bytes."""
    columns = max(1, size // (4 * INPUT_FEATURES))
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((INPUT_FEATURES, columns), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", INPUT_FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", columns])],
        [numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=ONNX_IR_VERSION
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def stand_in_deps(root: Path, size: int) -> DepsProvider:
    """A DepsProvider whose tree per platform is a fake package with SIZE bytes of 'native code'.

    Random bytes, like compiled libraries, barely compress; the seed comes
    from the platform, so each platform gets its own layer and every build
    the same one.
    """

    def provide(requirements: Sequence[str], platform: Platform) -> Path:
        tree = root / str(platform).replace("/", "-")
        if not tree.is_dir():
            package = tree / "standin_runtime"
            package.mkdir(parents=True)
            (package / "__init__.py").write_text(f'"""Stand-in for {", ".join(requirements)}."""\n')
            seed = zlib.crc32(str(platform).encode())
            (package / "_native.so").write_bytes(np.random.default_rng(seed).bytes(size))
            info = tree / "standin_runtime-0.0.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(
                "Metadata-Version: 2.1\nName: standin-runtime\nVersion: 0.0\n"
            )
        return tree

    return provide


# ---- the hub side ----------------------------------------------------------


def blob_dir_bytes(hub: HubProcess) -> int:
    blobs = hub.data_dir / "blobs" / "sha256"
    return sum(p.stat().st_size for p in blobs.rglob("*") if p.is_file())


def register(path: Path, env: dict[str, str]) -> int:
    record = cli_json(["model", "register", str(path), "--name", MODEL_NAME, "--quiet"], env)
    return int(record["version"])


def model_layer_digests(version: int, env: dict[str, str]) -> set[str]:
    """The distinct model-layer blobs across the platforms of the pushed package VERSION."""
    shown = cli_json(["package", "show", f"{MODEL_NAME}:{version}"], env)
    return {
        layer["digest"]
        for image in shown["images"]
        for layer in image["layers"]
        if layer["role"] == MODEL
    }


class CountingRegistry(Registry):
    """A Registry that counts the body bytes it receives, per digest."""

    def __init__(self, url: str, token: str | None) -> None:
        super().__init__(url, token)
        self.fetched: Counter[str] = Counter()

    def manifest(self, repo: str, reference: str) -> tuple[Descriptor, bytes]:
        descriptor, body = super().manifest(repo, reference)
        self.fetched[descriptor.digest] += len(body)
        return descriptor, body

    def open_blob(self, repo: str, digest: str, *, offset: int = 0) -> Iterator[bytes]:
        for chunk in super().open_blob(repo, digest, offset=offset):
            self.fetched[digest] += len(chunk)
            yield chunk


# ---- phase 1: build times --------------------------------------------------


@dataclass
class BuildTimes:
    tar: list[float]
    cli: list[float]
    in_process: list[float]


def tar_per_platform(model: Path, serving: Path, out: Path) -> None:
    for platform in DEFAULT_PLATFORMS:
        run(["tar", "-cf", str(out / f"{platform.replace('/', '-')}.tar"),
             "-C", str(model.parent), model.name, "-C", str(serving.parent), serving.name])


def bench_builds(
    model: Path, info: ModelInfo, env: dict[str, str], scratch: Path, rounds: int
) -> BuildTimes:
    """Each round: the tar baseline, the CLI --out build, the in-process build, in turn.

    Interleaved so that all three see the same disk and page cache conditions.
    """
    serving = scratch / "serving" / "serving.json"
    serving.parent.mkdir()
    serving.write_text(json.dumps({"model": MODEL_NAME, "version": 1, "runtime": "onnxruntime"}))
    tars, out = scratch / "tars", scratch / "build-out"
    cli_build = ["package", "build", f"{MODEL_NAME}:1", "--no-deps", "--out", str(out), "--quiet"]
    times = BuildTimes([], [], [])
    for _ in range(rounds):
        fresh(tars).mkdir()
        times.tar.append(timed(lambda: tar_per_platform(model, serving, tars))[0])
        times.cli.append(timed(lambda: run([*EDGEFLEET, *cli_build], env))[0])
        fresh(out)
        times.in_process.append(timed(lambda: build_package(
            out, name=MODEL_NAME, version=1, files={MODEL_FILE: model}, info=info, deps=None,
        ))[0])
        fresh(out)
    fresh(tars)
    return times


def build_rows(times: BuildTimes) -> list[Row]:
    tar = statistics.median(times.tar)
    baseline = f"tar x3 {seconds_text(times.tar)}"
    cli, in_process = statistics.median(times.cli), statistics.median(times.in_process)
    platforms = len(DEFAULT_PLATFORMS)
    return [
        Row(f"build in-process (build_package), {platforms} platforms",
            seconds_text(times.in_process), baseline, ratio(in_process, tar)),
        Row(f"build via CLI --no-deps --out, {platforms} platforms",
            seconds_text(times.cli), baseline, ratio(cli, tar)),
        Row("  of which CLI start-up + model download", f"{cli - in_process:.2f} s", "",
            f"{(cli - in_process) / cli:.0%} of the CLI build"),
    ]


# ---- phase 2: pushed builds and the hub's disk -----------------------------


@dataclass
class Push:
    update: Update
    seconds: float
    growth: int
    total: int  # the hub's blob directory after the push
    model_layers: int


def push_build(hub: HubProcess, update: Update, env: dict[str, str]) -> Push:
    extra = [] if update.model_changed else ["--prefer", PREFER]
    before = blob_dir_bytes(hub)
    seconds, _ = timed(lambda: cli_json(
        ["package", "build", f"{MODEL_NAME}:{update.version}", "--no-deps", "--quiet", *extra], env
    ))
    after = blob_dir_bytes(hub)
    layers = model_layer_digests(update.version, env)
    return Push(update, seconds, after - before, after, len(layers))


def register_and_push(hub: HubProcess, models: Sequence[Path], env: dict[str, str]) -> list[Push]:
    """Version 1 is registered already; 2 and 3 are registered here, each before its push."""
    pushes = []
    for update, model in zip(UPDATES, models, strict=True):
        if update.version > 1 and register(model, env) != update.version:
            raise RuntimeError(f"the hub did not number the new version {update.version}")
        pushes.append(push_build(hub, update, env))
    return pushes


def push_rows(pushes: list[Push], tar: float, model_size: int) -> list[Row]:
    rows = []
    for push in pushes:
        rows.append(Row(f"build via CLI + push + hub signs, v{push.update.version} "
                        f"({push.update.label})",
                        f"{push.seconds:.2f} s", f"tar x3 {tar:.2f} s", ratio(push.seconds, tar)))
    for push in pushes:
        expected = model_size if push.update.model_changed else 0
        ok = push.model_layers == 1 and abs(push.growth - expected) <= SMALL_BYTES
        verdict = "ok" if ok else "UNEXPECTED"
        layers = ("model layer stored once" if push.model_layers == 1
                  else f"{push.model_layers} model layers")
        comment = f"{ratio(push.growth, model_size)} of model, {verdict}; {layers}"
        rows.append(Row(f"hub disk growth, push v{push.update.version} ({push.update.label})",
                        size_text(push.growth),
                        f"model x{len(DEFAULT_PLATFORMS)} {size_text(model_size * 3)}", comment))
    first = pushes[0]
    rows.append(Row(f"hub disk total after push v{first.update.version}", size_text(first.total),
                    f"model {size_text(model_size)}",
                    f"{ratio(first.total, model_size)}: the registered file and the model layer "
                    "(a tar of it) are two blobs"))
    return rows


# ---- phase 3: what a device fetches ----------------------------------------


@dataclass
class Fetch:
    update: Update
    moved: Counter[str]  # part (layer role, JSON_PART, SIGNATURE_PART) -> bytes received
    layer_sizes: dict[str, int]  # role -> size of that layer in the version fetched

    @property
    def total(self) -> int:
        return sum(self.moved.values())


def device_parts(layout: OCILayout, index: Descriptor) -> tuple[dict[str, str], dict[str, int]]:
    """For DEVICE_PLATFORM's image under INDEX: digest -> part, and layer role -> size."""
    entries = parse_index(layout.get(index.digest), what="index")
    entry = next(e for e in entries if str(e.platform) == DEVICE_PLATFORM)
    manifest = parse_manifest(layout.get(entry.digest), what=f"{DEVICE_PLATFORM} manifest")
    parts = {index.digest: JSON_PART, entry.digest: JSON_PART, manifest.config.digest: JSON_PART}
    sizes = {}
    for layer in manifest.layers:
        role = layer.annotations.get(ROLE, "unlabelled")
        parts[layer.digest] = role
        sizes[role] = layer.size
    return parts, sizes


def pull(registry: CountingRegistry, repo: str, update: Update, layout: OCILayout, *,
         roles: Sequence[str] | None, signed: bool) -> Fetch:
    registry.fetched.clear()
    tag = str(update.version)
    index = pull_to_layout(registry, repo, tag, layout, platforms=[DEVICE_PLATFORM], roles=roles)
    parts, sizes = device_parts(layout, index)
    moved: Counter[str] = Counter()
    for digest, n in registry.fetched.items():
        moved[parts.get(digest, "other")] += n
    if signed:
        registry.fetched.clear()
        if not pull_signature(registry, repo, index.digest, layout):
            raise RuntimeError(f"{repo}:{tag} has no signature")
        moved[SIGNATURE_PART] += sum(registry.fetched.values())
    return Fetch(update, moved, sizes)


def pull_versions(hub: HubProcess, repo: str, layout_dir: Path, *, roles: Sequence[str] | None,
                  signed: bool) -> list[Fetch]:
    """Versions 1, 2 and 3 of REPO pulled in turn into one layout, as a device updates."""
    layout = OCILayout.create(layout_dir)
    with closing(CountingRegistry(hub.url, hub.admin_token)) as registry:
        fetches = [pull(registry, repo, update, layout, roles=roles, signed=signed)
                   for update in UPDATES]
    shutil.rmtree(layout_dir)
    return fetches


def build_containers(hub: HubProcess, models: Sequence[Path], info: ModelInfo,
                     deps: DepsProvider, scratch: Path) -> None:
    """Versions 1-3 with the stand-in deps, built in-process and pushed to CONTAINER_REPO."""
    layout_dir = scratch / "container-build"
    with Registry(hub.url, hub.admin_token) as registry:
        for update, model in zip(UPDATES, models, strict=True):
            result = build_package(
                layout_dir, name=MODEL_NAME, version=update.version, files={MODEL_FILE: model},
                info=info, deps=deps, prefer=None if update.model_changed else [PREFER],
            )
            push_layout(OCILayout(layout_dir), registry, CONTAINER_REPO, [result.tag])
    shutil.rmtree(layout_dir)


def fetch_rows(mode: str, fetches: list[Fetch], model_size: int) -> list[Row]:
    rows = []
    for fetch in fetches:
        version = fetch.update.version
        breakdown = ", ".join(f"{part} {size_text(n)}" for part, n in fetch.moved.most_common())
        rows.append(Row(f"{mode}: v{version - 1} -> v{version} ({fetch.update.label})",
                        size_text(fetch.total), f"model {size_text(model_size)}",
                        f"{ratio(fetch.total, model_size)} {fetch_verdict(fetch)}; {breakdown}"))
    return rows


def fetch_verdict(fetch: Fetch) -> str:
    """ok when only the layers that changed moved (plus small JSON and serving bytes)."""
    first = fetch.update.version == 1
    expected = {MODEL: fetch.layer_sizes[MODEL] if fetch.update.model_changed else 0}
    if DEPS in fetch.layer_sizes:
        expected[DEPS] = fetch.layer_sizes[DEPS] if first else 0
    wrong = [part for part, n in expected.items() if fetch.moved[part] != n]
    if wrong or fetch.total > sum(expected.values()) + SMALL_BYTES:
        return "UNEXPECTED (" + ", ".join(f"{p} {size_text(fetch.moved[p])}" for p in wrong) + ")"
    reused = [f"{part} {size_text(fetch.layer_sizes[part])}" for part, n in expected.items()
              if n == 0]
    return "ok" + (f" (reused {', '.join(reused)})" if reused else "")


# ---- optional: builds with the runtime's real Python packages --------------


def bench_deps_builds(env: dict[str, str], scratch: Path, no_deps: float) -> list[Row]:
    """CLI --out builds with pip-installed deps: an empty cache first, then the warm one."""
    deps_env = {**env, "XDG_CACHE_HOME": str(scratch / "cache")}
    out = scratch / "deps-out"
    rows = []
    for label in ("cold cache", "warm cache"):
        console.log(f"CLI build with the runtime's Python packages, {label}")
        seconds, summary = timed(lambda: cli_json(
            ["package", "build", f"{MODEL_NAME}:1", "--image", "--skip-unavailable",
             "--out", str(out), "--quiet"], deps_env))
        fresh(out)
        skipped = ", ".join(summary["skipped"]) or "none"
        rows.append(Row(f"build via CLI --image --out ({label}: pip, Debian base)",
                        f"{seconds:.1f} s",
                        f"--no-deps {no_deps:.2f} s",
                        f"{ratio(seconds, no_deps)}; built {', '.join(summary['platforms'])}; "
                        f"skipped {skipped}"))
    return rows


# ---- output and main -------------------------------------------------------




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=100, help="model size (default 100)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="local builds of each kind; the median is reported (default 3)")
    parser.add_argument("--with-deps", action="store_true",
                        help="also time builds with the runtime's Python packages (pip, PyPI)")
    args = parser.parse_args()
    if not 1 <= args.size_mb < MAX_SIZE_MB or args.rounds < 1:
        parser.error(f"--size-mb must be 1-{MAX_SIZE_MB - 1} and --rounds at least 1")

    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        scratch = Path(tmp)
        console.log(f"writing two {args.size_mb} MB ONNX models")
        models = [scratch / f"v{seed}" / MODEL_FILE for seed in (1, 2)]
        for seed, path in enumerate(models, start=1):
            write_onnx_model(path, args.size_mb * MB, seed)
        model_size = models[0].stat().st_size
        # Version 3 is version 2's file again, so only its serving options differ.
        per_version = [models[0], models[1], models[1]]
        info = inspect_model({MODEL_FILE: models[0]})
        hub = start_hub(scratch / "hub", tls=False)  # bench/tls.py measures TLS
        try:
            env = cli_env(hub, scratch)
            register(models[0], env)
            console.log(f"{args.rounds} rounds of builds: tar baseline, CLI --out, in-process")
            times = bench_builds(models[0], info, env, scratch, args.rounds)
            console.log("pushed builds: v1, v2 (new weights), v3 (same file, --prefer)")
            pushes = register_and_push(hub, per_version, env)
            console.log(f"native-mode pulls for {DEVICE_PLATFORM}")
            native = pull_versions(hub, f"models/{MODEL_NAME}", scratch / "native",
                                   roles=[MODEL, SERVING], signed=True)
            console.log("container packages with stand-in deps: build, push, pull")
            deps = stand_in_deps(scratch / "stand-in-deps", STAND_IN_DEPS_MB * MB)
            build_containers(hub, per_version, info, deps, scratch)
            container = pull_versions(hub, CONTAINER_REPO, scratch / "container",
                                      roles=None, signed=False)
            deps_rows = (bench_deps_builds(env, scratch, statistics.median(times.cli))
                         if args.with_deps else [])
        finally:
            hub.stop()
    print_table(
        build_rows(times) + deps_rows
        + push_rows(pushes, statistics.median(times.tar), model_size)
        + fetch_rows(f"fetch native {DEVICE_PLATFORM}", native, model_size)
        + fetch_rows(f"fetch container {DEVICE_PLATFORM} (stand-in deps)", container, model_size),
        f"edgefleet package bench: --size-mb {args.size_mb} --rounds {args.rounds}"
        f"{' --with-deps' if args.with_deps else ''}, {os.cpu_count()} CPUs",
        f"container rows: deps is a stand-in layer, {STAND_IN_DEPS_MB} MB of random-byte files "
        "per platform instead of pip's wheels; those packages are unsigned",
    )


if __name__ == "__main__":
    main()
