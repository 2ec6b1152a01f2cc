"""The managed broker: what a login change costs at runtime, and the broker's memory.

    .venv/bin/python bench/broker.py              # 10,000 logins and connections, ~1 min
    .venv/bin/python bench/broker.py --quick      # 1,000

Runs the hub's own ManagedBroker and BrokerLogins on loopback in a
temporary directory; no hub.

Rows:

- `add a device login` / `remove a device login` with N logins present:
  the password file is rewritten and Mosquitto reloads it (SIGHUP), and the
  call returns once a login with the file's new canary password works.
  Both grow with N (the whole file is written and read again). Enrollment
  holds the database's write lock for one `add` (hub/devices.py
  `enroll(grant=)`). The baseline is one MQTT CONNECT of an existing login
  (what each confirming probe costs).
- `add a device login (C connected)`: the same with C devices connected.
- `broker RSS`: idle with the hub's logins only, with N logins loaded, and
  with C devices connected (MQTT 3.1.1 CONNECTs with their own logins over
  raw sockets, each holding its connection), per connection.

Measured on the 2-core build machine (load ~3), 10,000 devices: add 94 ms,
remove 57 ms, add 1.1 s once all 10,000 are connected (a reload checks
every connected client's login again; changes made during one go together
in the next); broker RSS 8 MiB idle, 11 MiB with 10,000 logins, 19 MiB with
10,000 connected (~0.8 KiB each); ~2,700 CONNECTs/s. Mosquitto's
dynamic-security plugin, tried first, took 1.4 s per change and 120 MiB for
the same logins (it saves its whole JSON file after each change and needs
one role per device).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub import broker_config  # noqa: E402
from hub.broker import ManagedBroker, find_mosquitto  # noqa: E402
from hub.broker_config import BrokerConfig  # noqa: E402
from hub.broker_logins import BrokerLogins, logs_in  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def existing_logins(count: int) -> tuple[dict[str, str], dict[str, str]]:
    """COUNT device logins as the password file holds them, and their tokens."""
    tokens = {f"dev-{i:06d}": f"efd_bench{i}" for i in range(count)}
    logins = broker_config.parse_password_file("\n".join(
        broker_config.password_line(device, token, os.urandom(12))
        for device, token in tokens.items()))
    return logins, tokens


def mqtt_connect(port: int, device: str, token: str) -> socket.socket:
    """Log in and keep the connection (no keepalive, so it is never pinged)."""
    body = (b"\x00\x04MQTT" + bytes([4, 0xC2]) + struct.pack("!H", 0)
            + b"".join(struct.pack("!H", len(f)) + f for f in
                       (device.encode(), device.encode(), token.encode())))
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(bytes([0x10, len(body)]) + body)
    answer = sock.recv(4)
    if answer != b"\x20\x02\x00\x00":
        raise RuntimeError(f"{device} was refused: CONNACK {answer!r}")
    return sock


def timed(action: object, samples: int) -> float:
    """Median milliseconds of ACTION()."""
    times = []
    for i in range(samples):
        started = time.perf_counter()
        action(i)  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logins", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="1,000 logins and connections")
    args = parser.parse_args()
    if args.quick:
        args.logins = args.connections = 1000
    mosquitto = find_mosquitto()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "broker"
        config = BrokerConfig(host="127.0.0.1", port=free_port(), directory=directory,
                              max_queued_messages=100_000, user=psutil.Process().username())
        logins_present, tokens = existing_logins(args.logins)

        def managed(devices: set[str]) -> tuple[ManagedBroker, BrokerLogins]:
            broker = ManagedBroker(config, prepare=lambda: logins.write_all(),
                                   on_restart=lambda: None, mosquitto=mosquitto)
            logins = BrokerLogins(config, hub_password="bench", devices=lambda: devices,
                                  reload=broker.reload, timeout=60)
            return broker, logins

        directory.mkdir()
        broker, _ = managed(set())
        broker.start()
        time.sleep(0.5)
        idle = psutil.Process(broker.status()["pid"]).memory_info().rss
        broker.stop()

        config.password_path.write_text(broker_config.password_file(
            logins_present, hub_password="bench", canary="x"))
        broker, logins = managed(set(tokens))
        broker.start()
        try:
            process = psutil.Process(broker.status()["pid"])
            time.sleep(0.5)
            loaded = process.memory_info().rss
            device, token = next(iter(tokens.items()))
            baseline = timed(lambda i: logs_in("127.0.0.1", config.port, device, token, 10),
                             args.samples)
            add = timed(lambda i: logins.add_device(f"dev-new{i}", f"efd_new{i}"), args.samples)
            remove = timed(lambda i: logins.remove_device(f"dev-new{i}"), args.samples)
            n = f"{args.logins:,}"
            rows += [
                ("one MQTT login (CONNECT, CONNACK)", f"{baseline:.1f} ms", "1.0 (baseline)"),
                (f"add a device login ({n} present)", f"{add:.1f} ms", f"{add / baseline:.1f}"),
                (f"remove a device login ({n} present)", f"{remove:.1f} ms",
                 f"{remove / baseline:.1f}"),
            ]
            started = time.perf_counter()
            held = [mqtt_connect(config.port, device, token)
                    for device, token in list(tokens.items())[:args.connections]]
            took = time.perf_counter() - started
            time.sleep(1)
            connected = process.memory_info().rss
            # A reload checks every connected client's login again.
            add_online = timed(lambda i: logins.add_device(f"dev-more{i}", f"efd_more{i}"),
                               max(args.samples // 4, 3))
            rows.append((f"add a device login ({len(held):,} connected)", f"{add_online:.1f} ms",
                         f"{add_online / baseline:.1f}"))
            for sock in held:
                sock.close()
        finally:
            broker.stop()
    mib = 2**20
    rows += [
        ("broker RSS, idle (hub logins only)", f"{idle / mib:.1f} MiB", ""),
        (f"broker RSS, {args.logins:,} logins loaded", f"{loaded / mib:.1f} MiB",
         f"{loaded / idle:.1f} x idle"),
        (f"broker RSS, {len(held):,} devices connected", f"{connected / mib:.1f} MiB",
         f"{(connected - loaded) / max(len(held), 1) / 1024:.1f} KiB per connection"),
        (f"{len(held):,} CONNECTs one after another", f"{took:.1f} s",
         f"{len(held) / took:,.0f} logins/s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"Managed broker (Mosquitto, password file + ACL), load {os.getloadavg()[0]:.1f}")
    for name, value, ratio in rows:
        print(f"  {name:<{width}}  {value:>12}  {ratio}")


if __name__ == "__main__":
    main()
