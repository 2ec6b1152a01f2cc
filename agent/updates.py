"""How an update proceeds, and how each failure is undone: the agent's state machine.

One update moves one version of one deployment onto the device. Each state
is saved to disk (agent/state.py) *before* its step runs, so a crash or a
power loss resumes at a safe point. The old version keeps serving until the
new one has passed its self-test; only then does the route switch, in one
step inside the serving process (no request is dropped).

    state          step run in it                                  next
    -------------  ----------------------------------------------  ------------
    downloading    fetch this platform's model + serving layers,   verifying
                   manifests and signature (resumes via Range)
    verifying      signature (pinned hub key), every blob digest;   staged
                   unpack into DATA/versions/<name>/<version>-...
    staged         (files ready; nothing to do)                    starting
    starting       load the new version beside the old one, with   self_test
                   no traffic (the serving process's candidate slot)
    self_test      run the package's sample request on it          serving
    serving        switch the route; the new version is now the    (done)
                   good one, the old one is kept for rollback
    failed         (the step's error is recorded)                  rolling_back
    rolling_back   route back to the old version, unload the new   rolled_back
    rolled_back    (done; the error stays in the reported state)

After a restart the serving process starts fresh with the good versions
only, so an update caught in starting, self_test or serving starts again at
starting, and one caught in failed or rolling_back finishes its rollback.

Container mode (`agent run --mode container`) runs the same table with
other parts: the store is agent/container/store.py (downloading checks the
signature, then the engine pulls the image by digest; verifying checks the
engine's image id against the signed config) and the serving side is
agent/container/serving.py (starting runs the version's container on a
private port and puts it behind the front; serving switches the front and
removes the old container once drained). A serving side that is down
(`transient`: the engine) is waited for with backoff, reported in the state
the update waits in, before the step counts as failed.

Kubernetes mode instead passes an `UpdateDriver` (agent/kube/driver.py)
that runs its own steps through the same states, saves and reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from agent.clock import now
from agent.decisions import still_serving
from agent.loading import deployment_body, version_body
from agent.package_store import StagedVersion, StageError
from agent.serving.body import DeploymentBody
from agent.state import AgentState, Installed, Serving, StateFile, Update, status_key
from agent.supervisor import ServingError
from contract.protocol import Package, UpdateState
from contract.settings import Batching, SettingsError

if TYPE_CHECKING:
    from packager.distribution import Registry

log = logging.getLogger("edgefleet.agent")
S = UpdateState

NEXT = {
    S.DOWNLOADING: S.VERIFYING,
    S.VERIFYING: S.STAGED,
    S.STAGED: S.STARTING,
    S.STARTING: S.SELF_TEST,
    S.SELF_TEST: S.SERVING,
    S.FAILED: S.ROLLING_BACK,
    S.ROLLING_BACK: S.ROLLED_BACK,
}
# Where a saved update continues after a restart (the serving process is new then).
RESUME_AT = {
    S.DOWNLOADING: S.DOWNLOADING,
    S.VERIFYING: S.VERIFYING,
    S.STAGED: S.STAGED,
    S.STARTING: S.STARTING,
    S.SELF_TEST: S.STARTING,
    S.SERVING: S.STARTING,
    S.FAILED: S.ROLLING_BACK,
    S.ROLLING_BACK: S.ROLLING_BACK,
}
# Where the new version is unloaded, or about to be: a runtime it loaded with is not carried.
UNLOADING = {S.FAILED, S.ROLLING_BACK, S.ROLLED_BACK}
DOWNLOAD_ATTEMPTS = 5
# A serving side that is down for a while (container mode: the engine) is waited for.
SERVING_ATTEMPTS = 8


class ServingControl(Protocol):
    """What updates need of the serving process (agent/supervisor.py's ServingProcess)."""

    def put(self, name: str, body: DeploymentBody) -> Any: ...
    def delete(self, name: str) -> Any: ...
    def self_test(self, name: str, version: str, sample: Mapping[str, Any]) -> Any: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


class PackageSource(Protocol):
    """Where versions come from: the package store (native mode; agent/package_store.py) or
    the container engine (container mode; agent/container/store.py)."""

    def download(self, registry: Registry, package: Package) -> Any: ...
    def verify(self, package: Package) -> Any: ...
    def stage(self, deployment: str, version: int, package: Package,
              image: Any) -> StagedVersion: ...


class StepFailed(Exception):
    """A step could not be done; the update fails and is rolled back."""


class UpdateDriver(Protocol):
    """Another mode's steps (Kubernetes: agent/kube/driver.py), run through the same
    states, saves and reports; without one, the native steps below run."""

    def step(self, state: UpdateState, update: Update,
             current: Serving | None) -> Installed | None:
        """Run STATE's step (not SERVING's); VERIFYING returns the staged version.
        Raises StepFailed."""
        ...

    def loaded(self, update: Update) -> dict[str, Any]:
        """Where UPDATE's version runs once STARTING's step passed, as the serving process's
        PUT describes a version it loaded (runtime, device)."""
        ...

    def switch(self, update: Update, target: Serving) -> dict[str, Any]:
        """SERVING's step once TARGET is saved; answers as the serving process's PUT."""
        ...


def package_batching(serving: Mapping[str, Any]) -> dict[str, Any] | None:
    """The package's default batching, as its serving.json gives it (None: it gives none)."""
    given = serving.get("batching")
    try:
        return None if given is None else Batching.from_json(given).to_json()
    except SettingsError as exc:
        raise StepFailed(f"serving.json: {exc}") from None


@dataclass
class Updater:
    """Runs updates through the states above; REPORT is called at every transition."""

    state: AgentState
    state_file: StateFile
    store: PackageSource | None       # native and container mode's (None with a driver)
    registry: Callable[[], Registry]  # made on first use: an idle agent needs no HTTP client
    serving: ServingControl | None    # native mode's (None with a driver)
    report: Callable[[], None]
    sleep: Callable[[float], None] = time.sleep
    # Fault injection for crash tests (EDGEFLEET_AGENT_PAUSE_IN=state:seconds):
    # wait after a state is saved, so a test can kill the agent inside it.
    pause_in: tuple[str, float] | None = None
    driver: UpdateDriver | None = None

    def run(self, update: Update) -> bool:
        """Drive UPDATE to serving (True) or rolled back (False)."""
        current = RESUME_AT[S(update.state)] if update.state in RESUME_AT else S.DOWNLOADING
        waits = 0
        while True:
            self._enter(update, current)
            if current is S.ROLLED_BACK:
                self._finish(update)
                return False
            try:
                self._step(current, update)
            except ServingError as exc:
                if getattr(exc, "transient", False) and waits < SERVING_ATTEMPTS:
                    # Reported in the state it waits in; the step runs again after the wait.
                    waits += 1
                    delay = min(2 ** waits, 30)
                    log.warning("%s of %s: %s; again in %ds", current, update.deployment, exc,
                                delay)
                    self._set_status(update.deployment, update.model, update.version, current,
                                     f"waiting: {exc}"[:1000])
                    self.state_file.save(self.state)
                    self.report()
                    self.sleep(delay)
                    continue
                current = self._failed(update, current, exc)
                continue
            except (StepFailed, StageError, OSError) as exc:  # OSError: disk
                current = self._failed(update, current, exc)
                continue
            waits = 0
            if current is S.SERVING:
                self._finish(update)
                return True
            current = NEXT[current]

    def _failed(self, update: Update, current: UpdateState, exc: Exception) -> UpdateState:
        """Where an update goes after EXC in CURRENT."""
        if current is S.ROLLING_BACK:
            # The old version could not be restored in place: the
            # supervisor's restart loads the good versions from disk.
            log.error("rollback of %s failed: %s", update.deployment, exc)
            if self.serving is not None:
                self.serving.stop()
                self.serving.start()
            return S.ROLLED_BACK
        update.error = str(exc)
        log.warning("update of %s to %s failed in %s: %s", update.deployment,
                    update.version, current, exc)
        return S.FAILED

    # -- transitions ------------------------------------------------------------

    def _enter(self, update: Update, new: UpdateState) -> None:
        update.state = str(new)
        update.since = now()
        self.state.update = update
        self._set_status(update.deployment, update.model, update.version, new, update.error)
        self.state_file.save(self.state)
        self.report()
        if self.pause_in and self.pause_in[0] == str(new):
            self.sleep(self.pause_in[1])

    def _finish(self, update: Update) -> None:
        self.state.update = None
        self.state_file.save(self.state)
        self.report()

    def _set_status(self, name: str, model: str, version: int, state: UpdateState,
                    error: str | None, runtime: str | None = None,
                    device: str | None = None) -> None:
        """Set the reported status of NAME's VERSION. Without a RUNTIME, one this version was
        reported with goes on (the load in starting, until the switch says what serves), but
        not into a failure: no report shows it serving with no runtime."""
        mine = [s for s in self.state.statuses if s["name"] == name and s["version"] == version]
        if runtime is None and mine and state not in UNLOADING:
            runtime, device = mine[-1]["runtime"], mine[-1]["device"]
        statuses = [s for s in self.state.statuses if s not in mine]
        statuses.append({"name": name, "model": model, "version": version, "state": str(state),
                         "since": now(), "error": error, "runtime": runtime, "device": device})
        self.state.statuses = statuses

    # -- steps ------------------------------------------------------------------

    def _step(self, state: UpdateState, update: Update) -> None:
        if self.driver is not None and state is not S.SERVING:
            current = (self._unsave_switch(update) if state is S.ROLLING_BACK
                       else self.state.serving.get(update.deployment))
            installed = self.driver.step(state, update, current)
            if installed is not None:
                update.staged = installed
            if state is S.STARTING:
                loaded = self.driver.loaded(update)
                self._set_status(update.deployment, update.model, update.version, S.STARTING,
                                 None, loaded.get("runtime"), loaded.get("device"))
            return
        if state is S.SERVING:
            self._switch(update)
            return
        assert self.store is not None, "native mode has a package store"
        package = Package(update.repository, update.digest, update.size)
        if state is S.DOWNLOADING:
            self._download(package)
        elif state is S.VERIFYING:
            image = self.store.verify(package)
            staged = self.store.stage(update.deployment, update.version, package, image)
            update.staged = Installed(
                version=update.version, digest=update.digest, directory=str(staged.directory),
                entrypoint=staged.entrypoint, framework=staged.framework,
                prefer=list(update.prefer),
                package_prefer=list(staged.serving.get("prefer") or []),
                sample_request=staged.sample_request, image=staged.image,
                settings=dict(update.settings),
                package_batching=package_batching(staged.serving),
                sketch=update.sketch,
            )
        elif state is S.STARTING:
            self._start(update)
        elif state is S.SELF_TEST:
            self._self_test(update)
        elif state is S.ROLLING_BACK:
            self._roll_back(update)

    def _download(self, package: Package) -> None:
        assert self.store is not None
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                self.store.download(self.registry(), package)
                return
            except StageError as exc:
                if not exc.transient or attempt == DOWNLOAD_ATTEMPTS:
                    raise
                delay = min(2 ** attempt, 30)
                log.warning("download attempt %d failed (%s); again in %ds", attempt, exc, delay)
                self.sleep(delay)

    def _staged(self, update: Update) -> Installed:
        if update.staged is None:
            raise StepFailed("the version was never staged")
        return update.staged

    def _start(self, update: Update) -> None:
        """Load the new version beside the serving one, answering nothing yet."""
        assert self.serving is not None
        new = self._staged(update)
        current = self.state.serving.get(update.deployment)
        if current is None:
            body = DeploymentBody(version_body(new))  # nothing serves yet: nothing to protect
        elif current.primary.version == new.version:
            # The same version with other settings: the serving process loads and
            # self-tests it before it swaps, and keeps the old one if that fails.
            body = DeploymentBody(version_body(new, self_test=True))
        else:
            body = DeploymentBody(version_body(current.primary), version_body(new))
        answer = self.serving.put(update.deployment, body)
        loaded = answer["deployment"]["primary" if body.candidate is None else "candidate"]
        self._set_status(update.deployment, update.model, update.version, S.STARTING, None,
                         loaded.get("runtime"), loaded.get("device"))

    def _self_test(self, update: Update) -> None:
        assert self.serving is not None
        new = self._staged(update)
        if not new.sample_request:
            return  # a package without a sample request has nothing to test with
        self.serving.self_test(update.deployment, str(new.version), new.sample_request)

    def _switch(self, update: Update) -> None:
        new = self._staged(update)
        current = self.state.serving.get(update.deployment)
        if update.role == "primary":
            target = Serving(update.deployment, update.model, primary=new,
                             previous=current.primary if current else None)
        elif current is None:
            raise StepFailed("a candidate needs a primary version serving first")
        else:
            target = replace(current, candidate=new, traffic=update.traffic, shadow=update.shadow)
        # Saved before the switch: if we die right after it, the restart
        # loads this version, which has passed its self-test.
        self.state.serving[update.deployment] = target
        self.state_file.save(self.state)
        if self.driver is not None:
            answer = self.driver.switch(update, target)
        else:
            assert self.serving is not None
            answer = self.serving.put(update.deployment, deployment_body(target))
        self._record_loaded(target, answer)

    def _record_loaded(self, target: Serving, answer: dict[str, Any]) -> None:
        described = answer["deployment"]
        # Versions that no longer serve stop being reported as serving.
        self.state.statuses = still_serving(self.state.statuses, status_key, target.name,
                                            target.route())
        for role, installed in (("primary", target.primary), ("candidate", target.candidate)):
            if installed is not None and described.get(role):
                self._set_status(target.name, target.model, installed.version, S.SERVING, None,
                                 described[role].get("runtime"), described[role].get("device"))

    def _roll_back(self, update: Update) -> None:
        assert self.serving is not None
        current = self._unsave_switch(update)
        if current is None:
            try:
                self.serving.delete(update.deployment)
            except ServingError:
                pass  # nothing was loaded under that name
        else:
            self.serving.put(update.deployment, deployment_body(current))

    def _unsave_switch(self, update: Update) -> Serving | None:
        """What serves UPDATE's deployment once a switch to it, saved already, is undone."""
        current = self.state.serving.get(update.deployment)
        # The staged version itself, not just its number: the same version with other
        # preferences or settings is serving as it was, and is not undone.
        staged = update.staged
        if staged is not None and current is not None and staged in (current.primary,
                                                                    current.candidate):
            # Failed after the switch was saved (a restart mid-switch): undo it on disk too.
            if current.primary == staged and current.previous:
                current.primary, current.previous = current.previous, None
            elif current.candidate == staged:
                current.candidate = None
            else:
                del self.state.serving[update.deployment]
                current = None
            self.state_file.save(self.state)
        return current
