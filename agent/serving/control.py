"""The agent's control API, served on a unix socket only the agent can reach.

    PUT    /control/deployments/{name}                        load or replace a deployment
    DELETE /control/deployments/{name}                        unload it
    GET    /control/state                                     what is loaded, and where
    GET    /control/stats                                     request counters per version (JSON)
    POST   /control/deployments/{name}/versions/{v}/self-test run a sample request on a version

A PUT names the whole deployment (its body is declared in
agent/serving/body.py): its primary version, optionally a candidate that
answers a share of the requests (split) or sees a copy of a share of them
(shadow), and per version an optional self-test request (the package's
serving.json sample). Versions already
loaded with the same settings are reused; new ones are loaded off the event
loop and self-tested before anything changes. Only then is the route
swapped, in one step, and the versions left over retire: they close once
their in-flight requests are done. If a load or self-test fails the old
deployment keeps serving untouched and the answer is 422 with the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

from fastapi import FastAPI, Request

from agent.runtimes.base import LoadOptions
from agent.serving import batching, codec, loading
from agent.serving import body as body_schema
from agent.serving.body import NAME_PATTERN, DeploymentBody, VersionBody
from agent.serving.errors import BadRequest, ServingError, Unprocessable, install_handlers
from agent.serving.scoring import RestCall, Scorer, answer
from agent.serving.table import Deployment, ModelVersion

log = logging.getLogger("edgefleet.serving")


def spec_of(body: VersionBody) -> loading.VersionSpec:
    """What the serving process loads for BODY."""
    r = body.runtime
    options = LoadOptions(prefer=r.prefer, precision=r.precision, threads=r.threads,
                          extra=dict(r.extra))
    return loading.VersionSpec(body.version, body.model_dir, body.entrypoint, body.framework,
                               options, body.batching, body.upstream)


def read_body(raw: bytes) -> DeploymentBody:
    """The PUT body, read strictly (agent/serving/body.py); BadRequest with the first problem."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    try:
        return body_schema.read(value)
    except body_schema.BodyError as e:
        raise BadRequest(str(e)) from None


class Controller:
    def __init__(self, scorer: Scorer, upstream_key: str | None = None) -> None:
        """UPSTREAM_KEY: the API key of the containers upstream versions proxy to."""
        self.scorer = scorer
        self.upstream_key = upstream_key
        self.table = scorer.table
        self._locks: dict[str, asyncio.Lock] = {}

    async def put(self, name: str, body: DeploymentBody) -> dict[str, Any]:
        async with self._locks.setdefault(name, asyncio.Lock()):
            with self.table.loading(name):
                current = self.table.find(name)
                fresh: list[ModelVersion] = []
                tests: dict[str, Any] = {}
                try:
                    primary = await self._version(name, body.primary, current, fresh, tests)
                    candidate = None
                    if body.candidate is not None:
                        candidate = await self._version(name, body.candidate, current, fresh, tests)
                except BaseException:
                    for version in fresh:
                        version.retire()
                    raise
                deployment = Deployment(name, primary, candidate, body.traffic, body.shadow)
                retired = self.table.install(deployment)
                self.scorer.telemetry.sketch_with(name, primary.version, body.primary.sketch)
                if candidate is not None and body.candidate is not None:
                    self.scorer.telemetry.sketch_with(name, candidate.version,
                                                      body.candidate.sketch)
        log.info("deployment %s: %s", name,
                 ", ".join(f"{r} {v.version}" for r, v in deployment.roles()))
        return {
            "deployment": deployment.describe(),
            "loaded": [v.version for v in fresh],
            "retired": [v.version for v in retired],
            "self_test": tests,
        }

    async def _version(
        self,
        name: str,
        body: VersionBody,
        current: Deployment | None,
        fresh: list[ModelVersion],
        tests: dict[str, Any],
    ) -> ModelVersion:
        """The loaded version BODY asks for: the current one if its settings are the same."""
        spec = spec_of(body)
        for _, existing in current.roles() if current else ():
            if existing.spec == spec:
                return existing
        entry = spec.model_dir / spec.entrypoint
        if spec.upstream is None and not entry.is_file():
            raise Unprocessable(f"version '{spec.version}': model file {entry} does not exist")
        started = time.perf_counter()
        try:
            model = await asyncio.to_thread(loading.load, spec, self.upstream_key)
        except Exception as e:
            raise Unprocessable(f"version '{spec.version}' did not load: {e}") from None
        version = ModelVersion(name, spec, model)
        fresh.append(version)
        why = None if spec.batching is None else batching.unbatchable(model.signature)
        if why is not None:
            raise Unprocessable(f"version '{spec.version}' cannot batch: {why}")
        log.info("loaded %s on %s:%s in %.2fs", version, model.runtime, model.device,
                 time.perf_counter() - started)
        if body.self_test is not None:
            tests[spec.version] = await self.self_test(version, json.dumps(body.self_test).encode())
        return version

    async def self_test(self, version: ModelVersion, sample: bytes) -> dict[str, Any]:
        """Run SAMPLE (an inference request) on VERSION; Unprocessable with the reason if not."""
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(answer, version, RestCall(None, body=sample))
        except ServingError as e:
            raise Unprocessable(f"self-test of '{version}' failed: {e.message}") from None
        header, _ = codec.split_body(result.body, result.headers.get(codec.HEADER_LENGTH))
        return {
            "model_name": version.deployment,
            "model_version": version.version,
            "runtime": version.model.runtime,
            "device": version.model.device,
            "outputs": header["outputs"],
            "milliseconds": {
                "total": round((time.perf_counter() - started) * 1000, 3),
                "infer": round(result.infer_seconds * 1000, 3),
            },
        }

    async def delete(self, name: str) -> dict[str, Any]:
        async with self._locks.setdefault(name, asyncio.Lock()):
            deployment = self.table.remove(name)
        return {"name": name, "retired": [v.version for _, v in deployment.roles()]}

    def state(self) -> dict[str, Any]:
        limiter = self.scorer.limiter
        return {
            "ready": self.table.ready,
            "deployments": [d.describe() for d in self.table.deployments()],
            "draining": [
                {"name": v.deployment, "version": v.version, "in_flight": v.users}
                for v in self.table.draining()
            ],
            "limits": {
                "max_concurrency": limiter.max_concurrency,
                "max_queue": limiter.max_queue,
                "max_wait_ms": None if limiter.max_wait is None else limiter.max_wait * 1000,
                "in_flight": limiter.running,
                "queued": limiter.waiting,
                "backlog_seconds": round(limiter.backlog, 6),
            },
        }


def create_app(controller: Controller) -> FastAPI:
    app = FastAPI(title="edgefleet serve control", docs_url=None, redoc_url=None)
    install_handlers(app)

    @app.put("/control/deployments/{name}")
    async def put(name: str, request: Request) -> dict[str, Any]:
        _check_name(name)
        return await controller.put(name, read_body(await request.body()))

    @app.delete("/control/deployments/{name}")
    async def delete(name: str) -> dict[str, Any]:
        return await controller.delete(name)

    @app.get("/control/state")
    async def state() -> dict[str, Any]:
        return controller.state()

    @app.get("/control/stats")
    async def stats() -> list[dict[str, Any]]:
        telemetry = controller.scorer.telemetry
        await asyncio.to_thread(telemetry.settle_sketches)  # counted off the request path
        return telemetry.stats()

    @app.post("/control/deployments/{name}/versions/{version}/self-test")
    async def self_test(name: str, version: str, request: Request) -> dict[str, Any]:
        leased = controller.table.lease(name, version)
        try:
            return await controller.self_test(leased, await request.body())
        finally:
            leased.release()

    return app


def _check_name(name: str) -> None:
    if not re.fullmatch(NAME_PATTERN, name):
        raise BadRequest(f"deployment name {name!r} must match {NAME_PATTERN}")
