"""One simulated device in process, without a broker: it decides as the agent does."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.identity import Identity
from agent.mqtt import Message
from agent.sim.device import SimDevice, Slot
from agent.sim.options import SimOptions
from contract import signing
from contract.protocol import Deployment as Wanted
from contract.protocol import (
    DesiredState,
    Package,
    RuntimeSpec,
    UpdateState,
    desired_topic,
    sign_desired,
)
from contract.settings import Batching, Resources, Settings

DIGEST = "sha256:" + "a" * 64


def test_the_simulator_reloads_on_a_prefer_only_change_like_the_agent(tmp_path: Path) -> None:
    key = signing.generate_private_key()
    identity = Identity("dev-sim", "sim-0", "http://127.0.0.1:9", "token", "mqtt://127.0.0.1:9",
                        "dev-sim", "password", signing.public_key_pem(key))

    async def body() -> None:
        device = SimDevice(identity, SimOptions(data_dir=tmp_path, step_latency=0),
                           asyncio.Semaphore(1))
        generation = 0

        async def apply(prefer: tuple[str, ...]) -> None:
            nonlocal generation
            generation += 1
            now = datetime.now(UTC)
            state = DesiredState("dev-sim", generation, now, now + timedelta(hours=1), (
                Wanted("d", "m", 1, Package("models/m", DIGEST, 10), RuntimeSpec(prefer)),))
            device._received(Message(desired_topic("dev-sim"), sign_desired(state, key)))
            while device.updating:
                await asyncio.sleep(0.01)
            assert device.applied_generation == generation

        await apply(("onnxruntime:CPU",))
        assert (device.updates, device.versions()) == (1, {"d": 1})
        await apply(("onnxruntime:CPU",))  # nothing changed: nothing runs
        assert device.updates == 1
        await apply(("openvino:GPU",))     # only the preferences changed: loaded again
        assert device.updates == 2
        assert device.serving["d"].route.primary.prefer == ("openvino:GPU",)
        assert device.state_of("d", 1) is UpdateState.SERVING

    asyncio.run(asyncio.wait_for(body(), 30))


def test_the_simulator_reloads_on_a_settings_only_change_and_keeps_them(
        tmp_path: Path) -> None:
    key = signing.generate_private_key()
    identity = Identity("dev-sim", "sim-0", "http://127.0.0.1:9", "token", "mqtt://127.0.0.1:9",
                        "dev-sim", "password", signing.public_key_pem(key))
    settings = Settings(Resources(500, 2**30, (("nvidia.com/gpu", 1),)), Batching(8, 2))

    async def body() -> None:
        device = SimDevice(identity, SimOptions(data_dir=tmp_path, step_latency=0),
                           asyncio.Semaphore(1))
        for generation, chosen in ((1, Settings()), (2, settings), (3, settings)):
            now = datetime.now(UTC)
            state = DesiredState("dev-sim", generation, now, now + timedelta(hours=1), (
                Wanted("d", "m", 1, Package("models/m", DIGEST, 10), settings=chosen),))
            device._received(Message(desired_topic("dev-sim"), sign_desired(state, key)))
            while device.updating:
                await asyncio.sleep(0.01)
        assert device.updates == 2   # the settings change reloaded; the same again did not
        assert device.serving["d"].route.primary.settings == settings
        saved = asdict(device.serving["d"])
        assert Slot.restore(json.loads(json.dumps(saved))).route == device.serving["d"].route

    asyncio.run(asyncio.wait_for(body(), 30))
