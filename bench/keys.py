"""What key rotation and the retained-state watch cost, in process, as ratios.

1. **A desired state with the rotation chain.** The payload's size and the agent's
   work on it (`contract.keys.follow` from the key it trusts, then
   `protocol.verify_desired`) with a chain of 0, 1, 8 and 16 statements (the most a
   state carries), against the same state with no chain (ratio 1.0: no cost). "fresh"
   is a device that walks the whole chain; "current" one that already trusts the
   newest key and skips every statement.
2. **A simulated fleet follows a rotation** (`--fleet N`, default 300): a real hub with
   its managed Mosquitto (TLS, device certificates) and N simulated devices
   (agent/sim) that follow the chain with the agent's code. The time from
   `POST /keys/rotate` to every device trusting the new key, against the time from a
   rollout to 100 % to every device applying it, in the same run: a rotation costs
   what publishing every device's state costs, plus signing the packages again.
3. **The hub's retained-state watch** (`hub.retained.RetainedWatch.see`): messages a
   second over DEVICES devices' retained states, as the hub judges them on every
   (re)connect, against the ingest's own writing of the same number of reported
   states (`hub.ingest.write_batch`) in the same run: the watch's share of a reconnect.

Run: `.venv/bin/python bench/keys.py` (~2 min on 2 cores); `--quick` for a smoke run.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

# Ahead of this directory (harness comes from it), whose agent.py would shadow the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from agent.mqtt import Message  # noqa: E402
from contract import keys, protocol, signing  # noqa: E402
from harness import timed  # noqa: E402
from hub.ingest import write_batch  # noqa: E402
from hub.keys import KeyRing  # noqa: E402
from hub.retained import RetainedWatch  # noqa: E402
from hub.storage.db import Database  # noqa: E402

NOW = datetime.now(UTC)


def check(payload: bytes, public: ec.EllipticCurvePublicKey, start: keys.Trust) -> None:
    """What an agent does with a desired state: follow its chain, then verify it."""
    trust = keys.follow(start, protocol.rotation_chain(payload))
    protocol.verify_desired(payload, public_key=public, device_id="dev-1", last_generation=1,
                            now=NOW, retired=trust.retired)


def chain_costs(repeat: int) -> None:
    made = [signing.generate_private_key() for _ in range(17)]
    chain = [keys.sign_rotation(sequence=i + 1, previous=signing.key_id(made[i]),
                                key_pem=signing.public_key_pem(made[i + 1]), issued_at=NOW,
                                signer=made[i]) for i in range(16)]
    state = protocol.DesiredState("dev-1", 2, NOW, NOW + timedelta(days=30), ())
    print("| chain | bytes | x no chain | fresh device, ms | x | current device, ms | x |")
    print("|---|---|---|---|---|---|---|")
    base_size = base_time = 0.0
    for length in (0, 1, 8, 16):
        newest = made[length]
        payload = protocol.sign_desired(state, newest, chain[:length])
        public = signing.load_public_key(signing.public_key_pem(newest))

        fresh = keys.Trust(key=signing.public_key_pem(made[0]))
        current = keys.Trust(key=signing.public_key_pem(newest), sequence=length)
        t_fresh = timed(lambda: check(payload, public, fresh), repeat)  # noqa: B023
        t_current = timed(lambda: check(payload, public, current), repeat)  # noqa: B023
        if length == 0:
            base_size, base_time = len(payload), t_fresh
        print(f"| {length} | {len(payload)} | {len(payload) / base_size:.1f} | "
              f"{t_fresh * 1e3:.2f} | {t_fresh / base_time:.1f} | {t_current * 1e3:.2f} | "
              f"{t_current / base_time:.1f} |")


def watch_cost(devices: int, work: Path) -> None:
    db = Database(work / "hub.db")
    ring = KeyRing(work / "keys" / "hub-signing.key")
    ids = [f"dev-{i}" for i in range(devices)]
    retained = [(d, ring.sign_desired(protocol.DesiredState(d, 1, NOW, NOW + timedelta(days=30),
                                                            ()))) for d in ids]
    with db.transaction() as conn:
        conn.executemany("INSERT INTO devices (id, name, tags, desired_generation,"
                         " applied_generation, published_generation) VALUES (?, ?, '{}', 1, 0, 1)",
                         [(d, d) for d in ids])

    def watch(digests: bool) -> float:
        """Seconds to judge every retained state; DIGESTS: the hub recorded what it published
        (else each signature is checked, as for states someone else put there)."""
        with db.transaction() as conn:
            conn.executemany("UPDATE devices SET published_digest = ? WHERE id = ?", [
                (hashlib.sha256(p).hexdigest() if digests else None, d) for d, p in retained])
        judge = RetainedWatch(db, ring)
        start = time.perf_counter()
        for i in range(0, devices, 500):  # the ingest loop's batches
            judge.see(retained[i:i + 500])
        assert judge.stats()["suspects"] == 0
        return time.perf_counter() - start

    t_own, t_checked = watch(True), watch(False)
    reports = [Message(protocol.reported_topic(d), protocol.build_reported(protocol.ReportedState(
        d, 1, (), "linux/amd64", (), "bench"))) for d in ids]
    start = time.perf_counter()
    for i in range(0, devices, 500):
        write_batch(db, reports[i:i + 500])
    t_ingest = time.perf_counter() - start
    print(f"\n{devices} retained states judged at a reconnect, against writing as many reported "
          "states\n\n| | msg/s | x ingest time |\n|---|---|---|")
    for name, seconds in (("the hub's own (digest)", t_own),
                          ("others' (signature checked)", t_checked),
                          ("ingest of reported states", t_ingest)):
        print(f"| {name} | {devices / seconds:,.0f} | {seconds / t_ingest:.2f} |")


def fleet_rotation(count: int, work: Path) -> None:
    import asyncio

    import httpx

    from agent.sim import Fleet, SimOptions
    from harness import enrollment_token, publish_version, start_hub
    from packager.samples import make_onnx

    hub = start_hub(work / "hub")
    try:
        publish_version(hub, "tiny", make_onnx(work / "model.onnx"),
                        extra=("--platform", "linux/arm64"))
        token = enrollment_token(hub, tags={"site": "bench"})
        api = httpx.Client(base_url=hub.url, verify=hub.verify, timeout=60,
                           headers={"Authorization": f"Bearer {hub.admin_token}"})

        async def run() -> tuple[float, float]:
            options = SimOptions(data_dir=work / "sim", telemetry_interval=30.0,
                                 step_latency=0.01, connect_jitter=2.0)
            async with Fleet(hub.url, token, count, options) as fleet:
                await fleet.wait(lambda f: f.connected == count, timeout=600, what="connected")
                start = time.perf_counter()
                await asyncio.to_thread(lambda: api.post("/api/v1/rollouts", json={
                    "model": "tiny", "version": 1, "target": {"site": "bench"},
                    "waves": "100%"}).raise_for_status())
                await fleet.wait(lambda f: all(d.applied_generation == 1 for d in f.devices),
                                 timeout=600, what="the rollout applied")
                deployed = time.perf_counter() - start
                start = time.perf_counter()
                rotated = await asyncio.to_thread(
                    lambda: api.post("/api/v1/keys/rotate", json={}).raise_for_status().json())
                await fleet.wait(lambda f: all(d.hub_key == rotated["current"]
                                               for d in f.devices),
                                 timeout=600, what="every device trusting the new key")
                assert not any(d.refusals for d in fleet.devices)
                return deployed, time.perf_counter() - start

        deployed, rotated = asyncio.run(run())
    finally:
        hub.stop()
    print(f"\n{count} simulated devices (TLS, managed Mosquitto)\n\n| | seconds | x rollout |"
          f"\n|---|---|---|\n| rollout to 100 %, all applied | {deployed:.1f} | 1.00 |\n"
          f"| key rotation, all trusting the new key | {rotated:.1f} | "
          f"{rotated / deployed:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--devices", type=int, default=10_000,
                        help="retained states for the watch's part")
    parser.add_argument("--fleet", type=int, default=300, help="simulated devices")
    args = parser.parse_args()
    repeat = 20 if args.quick else 200
    chain_costs(repeat)
    with tempfile.TemporaryDirectory() as work:
        fleet_rotation(30 if args.quick else args.fleet, Path(work))
    with tempfile.TemporaryDirectory() as work:
        watch_cost(1000 if args.quick else args.devices, Path(work))


if __name__ == "__main__":
    main()
