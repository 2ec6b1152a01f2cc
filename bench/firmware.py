"""Benchmark device image builds: cold (empty cache) and warm, per step, and the image's size.

Run from the repository root as root (mmdebstrap):

    .venv/bin/python bench/firmware.py                       # generic-amd64, warm then warm
    .venv/bin/python bench/firmware.py --cold                # first with an empty cache
    .venv/bin/python bench/firmware.py --class generic-arm64 # arm64 disk image (qemu-user)
    .venv/bin/python bench/firmware.py --class generic-arm64 --cold  # ~35 min, twice

A cold build downloads every .deb and wheel; a warm one finds them in the cache
(~/.cache/edgefleet/firmware, or a temporary one with --cold) and downloads only
edgefleet's wheel build requirements. Both build (--rebuild), though the image cache
holds an image from the same inputs. Steps, from CLASS.json: wheels (edgefleet's
wheel built and the dependencies' fetched), rootfs (mmdebstrap, the venv, the
service), image (the disk put together, or the tar). Sizes: the file's length and
the bytes it takes on disk (the raw image is sparse). The boot time is measured by
tests/test_firmware_boot.py (pytest -s prints it). Table to stdout, progress to stderr.
The figures measured so far, both classes, are in firmware-images/README.md (Measured).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(cls: str, out: Path, cache: Path | None) -> tuple[float, dict]:
    # --rebuild: the build is measured, not the copy of a kept image with the same inputs.
    command = [sys.executable, "-m", "edgefleet", "firmware", "build", cls, "--out", str(out),
               "--rebuild"]
    if cache is not None:
        command += ["--cache-dir", str(cache)]
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.monotonic() - started, json.loads((out / f"{cls}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--class", dest="cls", default="generic-amd64")
    parser.add_argument("--cold", action="store_true", help="first build with an empty cache")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-firmware-") as work:
        cache = Path(work) / "cache" if args.cold else None
        for name in ("cold" if args.cold else "warm", "warm"):
            out = Path(work) / name
            print(f"{name} build of {args.cls}...", file=sys.stderr)
            seconds, info = build(args.cls, out, cache)
            rows.append((name, seconds, info))
    print("| build | total s | wheels s | rootfs s | image s | size MiB | on disk MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, seconds, info in rows:
        steps = info["seconds"]
        print(f"| {name} | {seconds:.0f} | {steps['wheels']:.0f} | {steps['rootfs']:.0f} | "
              f"{steps['image']:.0f} | {info['size'] / 2**20:.0f} | "
              f"{info['allocated'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
