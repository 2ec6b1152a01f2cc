"""The dashboard in a real headless Chromium against a real hub and simulated devices.

A real Mosquitto, a real `edgefleet hub serve` using it, the tests' tiny ONNX
model as versions 1 and 2 with signed packages, and two `edgefleet sim`
processes: four good devices (ring=good) and one whose self-test of tiny:2
always fails (ring=bad). One more device, enrolled over REST and never
connected, is named `<script>alert(1)</script>`. Chromium (tests/browser.py)
signs in, reads the pages and presses their buttons as a user would; the
REST API is the referee.

Screenshots go to $EDGEFLEET_ARTIFACTS (default: artifacts/ in pytest's
temporary directory); with EDGEFLEET_UPDATE_SCREENSHOTS=1 they are also
copied to docs/screenshots/ for the documentation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Dialog, Page, expect

from agentproc import wait_for
from bench.browser import available, chromium, sign_in
from conftest import Cli
from contract import signing
from hubproc import EDGEFLEET, HubProcess, start_hub, stop_process
from modelgen import make_onnx
from mosquitto import Mosquitto, start_mosquitto

HOSTILE = "<script>alert(1)</script>"
HOSTILE_TAG = '<img src=x onerror="alert(2)">'
DOCS_SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
WAIT_MS = 60_000
# Chromium reads its own trust store (NSS), not SSL_CERT_FILE: the test run's CA is unknown
# to it. The pages still come over HTTPS (the session cookie is Secure).
HUB_CA_NOT_IN_CHROMIUM = True


@dataclass
class Site:
    hub: HubProcess
    broker: Mosquitto
    viewer_token: str
    hostile_id: str
    good: list[str]   # device ids, ring=good
    bad: str          # device id, ring=bad: tiny:2 fails its self-test there
    artifacts: Path

    def api(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.hub.url, timeout=30, headers={
            "Authorization": f"Bearer {token or self.hub.admin_token}"})

    def get(self, path: str, **params: Any) -> Any:
        with self.api() as api:
            answer = api.get(path, params=params)
        answer.raise_for_status()
        return answer.json()

    def shot(self, page: Page, name: str, *, full_page: bool = True) -> None:
        path = self.artifacts / f"{name}.png"
        page.screenshot(path=path, full_page=full_page)
        if os.environ.get("EDGEFLEET_UPDATE_SCREENSHOTS") == "1":
            DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, DOCS_SHOTS / path.name)


def _token(api: httpx.Client, path: str, body: dict[str, Any]) -> str:
    answer = api.post(path, json=body)
    answer.raise_for_status()
    return str(answer.json()["token"])


@dataclass
class Sim:
    """An `edgefleet sim` process and the thread reading its status lines (a full
    pipe would stop it)."""

    process: subprocess.Popen[str]
    reader: threading.Thread

    def stop(self) -> None:
        stop_process(self.process)
        self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _start_sim(hub: HubProcess, base: Path, name: str, count: int, token: str,
               *extra: str) -> Sim:
    process = subprocess.Popen(
        [*EDGEFLEET, "sim", "--devices", str(count), "--hub", hub.url, "--token", token,
         "--data-dir", str(base / name), "--name-prefix", f"{name}-",
         "--telemetry-interval", "1", "--rps", "20", "--step-latency", "0.1",
         "--json-status-every", "0.5", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if json.loads(line)["connected"] == count:
            break
    else:
        raise AssertionError(f"sim {name} ended before its devices connected")
    reader = threading.Thread(target=lambda: [None for _ in process.stdout or ()], daemon=True)
    reader.start()
    return Sim(process, reader)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    missing = available()
    if missing:
        pytest.fail(missing)
    base = tmp_path_factory.mktemp("ui")
    artifacts = Path(os.environ.get("EDGEFLEET_ARTIFACTS")
                     or tmp_path_factory.getbasetemp() / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    broker = start_mosquitto(base / "mosquitto")
    hub = start_hub(base / "hub", extra_args=("--mqtt-url", broker.url))
    sims: list[Sim] = []
    try:
        cli = Cli(hub, base)
        model = make_onnx(base / "model.onnx")
        with httpx.Client(base_url=hub.url, timeout=30,
                          headers={"Authorization": f"Bearer {hub.admin_token}"}) as api:
            for _ in (1, 2):
                digest = api.post("/api/v1/blobs", content=model.read_bytes()).json()["digest"]
                api.post("/api/v1/models/tiny/versions", json={
                    "files": [{"path": "model.onnx", "digest": digest}],
                    "tags": {"stage": "prod"}, "metrics": {"auc": 0.91},
                    "lineage": {"git_commit": "0123abc"}}).raise_for_status()
            for version in (1, 2):
                cli.run("package", "build", f"tiny:{version}", "--no-deps",
                        "--platform", "linux/arm64")
            viewer = _token(api, "/api/v1/tokens", {"name": "watcher", "role": "viewer"})
            good = _token(
                api, "/api/v1/enrollment-tokens", {"tags": {"site": "ui", "ring": "good"}}
            )
            bad = _token(api, "/api/v1/enrollment-tokens", {"tags": {"site": "ui", "ring": "bad"}})
            hostile = _token(api, "/api/v1/enrollment-tokens", {"tags": {"site": "elsewhere"}})
            enrolled = api.post("/api/v1/enroll", json={
                "token": hostile, "name": HOSTILE,
                "public_key": signing.public_key_pem(signing.generate_private_key())})
            enrolled.raise_for_status()
            hostile_id = enrolled.json()["device"]["id"]
            api.patch(f"/api/v1/devices/{hostile_id}/tags",
                      json={"set": {"note": HOSTILE_TAG}}).raise_for_status()
        sims.append(_start_sim(hub, base, "good", 4, good))
        sims.append(_start_sim(hub, base, "bad", 1, bad, "--fail-versions", "tiny:2"))
        listed = httpx.get(f"{hub.url}/api/v1/devices", headers={
            "Authorization": f"Bearer {hub.admin_token}"}).json()
        by_ring: dict[str, list[str]] = {}
        for d in listed:
            by_ring.setdefault(d["tags"].get("ring", ""), []).append(d["id"])
        yield Site(hub, broker, viewer, hostile_id, sorted(by_ring["good"]), by_ring["bad"][0],
                   artifacts)
    finally:
        for sim in sims:
            sim.stop()
        code = hub.stop()
        broker.stop()
        assert code == 0, hub.log()


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Browser]:
    with chromium() as running:
        yield running


@pytest.fixture(scope="module")
def admin(browser: Browser) -> Iterator[BrowserContext]:
    """The admin's browser profile: signed in once, by the first test that needs it."""
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  ignore_https_errors=HUB_CA_NOT_IN_CHROMIUM)
    yield context
    context.close()


@pytest.fixture
def page(site: Site, admin: BrowserContext) -> Iterator[Page]:
    """A signed-in admin's tab; a dialog (an injected alert()) or a script error on any
    page fails the test."""
    trouble: list[str] = []

    def dialog(opened: Dialog) -> None:
        trouble.append(f"dialog {opened.message!r}")
        opened.dismiss()

    tab = admin.new_page()
    tab.on("dialog", dialog)
    tab.on("pageerror", lambda error: trouble.append(f"script error {error}"))
    if not admin.cookies(site.hub.url + "/ui/"):
        sign_in(tab, site.hub.url, site.hub.admin_token)
    yield tab
    tab.close()
    assert not trouble, trouble


def _facet(page: Page, name: str) -> dict[str, int]:
    counts = {}
    for link in page.locator(f'a[data-facet="{name}"]').all():
        value = link.get_attribute("data-value")
        counts[str(value)] = int(link.locator(".count").inner_text())
    return counts


def test_sign_in_refuses_a_wrong_token_and_the_fleet_counts_match_the_api(
        site: Site, admin: BrowserContext) -> None:
    tab = admin.new_page()
    tab.goto(f"{site.hub.url}/ui/rollouts")
    assert "/ui/signin" in tab.url
    tab.get_by_label("API token").fill("eft_not-a-token")
    tab.get_by_role("button", name="Sign in").click()
    expect(tab.get_by_role("alert")).to_contain_text("unknown API token")
    tab.get_by_label("API token").fill(site.hub.admin_token)
    tab.get_by_role("button", name="Sign in").click()
    tab.wait_for_url(f"{site.hub.url}/ui/rollouts")  # back where it was going
    session = next(c for c in admin.cookies(site.hub.url + "/ui/")
                   if c["name"] == "edgefleet_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["secure"]

    # The sims' devices are online once their retained births arrived.
    wait_for(lambda: Counter(d["status"] for d in site.get("/api/v1/devices"))["online"] == 5,
             what="5 devices online")
    devices = site.get("/api/v1/devices", limit=100_000)
    tab.goto(f"{site.hub.url}/ui/fleet")
    assert tab.locator("#fleet-total").inner_text() == f"{len(devices)} devices"
    assert _facet(tab, "status") == dict(Counter(d["status"] for d in devices))
    assert _facet(tab, "platform") == dict(Counter(d["platform"] or "unknown" for d in devices))
    assert _facet(tab, "accelerator") == dict(Counter(
        a for d in devices for a in d["inventory"].get("accelerators", [])))
    tags = Counter(f"{k}={v}" for d in devices for k, v in d["tags"].items())
    shown = _facet(tab, "tag")
    assert shown == {k: tags[k] for k in shown} and shown["ring=good"] == 4
    site.shot(tab, "fleet")

    # A filter and a search, as a user clicks them.
    tab.locator('a[data-facet="tag"][data-value="ring=good"]').click()
    expect(tab.locator("#matching")).to_have_text("4")
    tab.get_by_label("Search devices by name or id").fill("good-00002")
    tab.get_by_role("button", name="Search").click()
    expect(tab.locator("#matching")).to_have_text("1")
    expect(tab.locator("a.device-link")).to_have_text("good-00002")
    tab.close()


def test_a_device_page_draws_its_telemetry_charts(site: Site, page: Page) -> None:
    device = site.good[0]
    # A few telemetry rounds (every second) before the page is drawn.
    wait_for(lambda: len(site.get(f"/api/v1/devices/{device}/telemetry")) >= 10,
             what="telemetry stored")
    page.goto(f"{site.hub.url}/ui/fleet?tag=ring%3Dgood")
    page.locator("a.device-link", has_text=re.compile("^good-")).first.click()
    page.get_by_label("Window", exact=True).select_option("15m")  # applies itself (data-autosubmit)
    page.wait_for_url(re.compile(r"window=15m"))
    cpu = page.locator("figure.chart", has_text="CPU")
    expect(cpu.locator("svg[role=img] path.line")).to_have_count(1)
    assert cpu.locator("svg[role=img] path.line").get_attribute("d", timeout=WAIT_MS)
    assert page.locator("figure.chart svg").count() >= 2
    site.shot(page, "device")


def _create_rollout(page: Page, site: Site, **fields: str) -> str:
    page.goto(f"{site.hub.url}/ui/rollouts")
    for label, value in fields.items():
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_role("button", name="Start rollout").click()
    page.wait_for_url(re.compile(r"/ui/rollouts/r-\d+$"))
    return page.url.rsplit("/", 1)[1]


def test_a_rollout_made_from_the_form_is_validated_like_the_api_and_completes_live(
        site: Site, page: Page) -> None:
    page.goto(f"{site.hub.url}/ui/rollouts")
    page.get_by_label("Model", exact=True).fill("tiny")
    page.get_by_label("Version", exact=True).fill("1")
    page.get_by_label("Target tags").fill("site=ui")
    page.get_by_label("Waves").fill("5%,50%")
    page.get_by_role("button", name="Start rollout").click()
    with site.api() as api:
        refused = api.post("/api/v1/rollouts", json={
            "model": "tiny", "version": 1, "target": {"site": "ui"}, "waves": "5%,50%"})
    assert refused.status_code == 422
    expect(page.get_by_role("alert")).to_have_text(refused.json()["detail"])
    assert page.get_by_label("Target tags").input_value() == "site=ui"  # nothing lost

    rollout = _create_rollout(page, site, **{"Model": "tiny", "Version": "1",
                                             "Target tags": "site=ui", "Waves": "2,100%"})
    page.evaluate("window.stillTheSamePage = true")
    expect(page.locator('[data-field="state"]')).to_have_text("completed", timeout=WAIT_MS)
    assert page.evaluate("window.stillTheSamePage") is True  # polled, never reloaded
    record = site.get(f"/api/v1/rollouts/{rollout}")
    assert record["state"] == "completed"
    assert [w["serving"] for w in record["waves_progress"]] == [2, 3]
    expect(page.locator("#wave-rows tr")).to_have_count(2)
    assert page.locator("#wave-rows tr").nth(1).locator("td").nth(3).inner_text() == "3"
    site.shot(page, "rollout-completed")


def test_pause_and_resume_from_the_buttons(site: Site, page: Page) -> None:
    rollout = _create_rollout(page, site, **{
        "Model": "tiny", "Version": "2", "Target tags": "ring=good", "Waves": "1,100%",
        "Soak per wave": "8s"})
    # Wave 1 (one device) serves, then soaks: the countdown shows it.
    expect(page.locator('[data-field="soak_left"]')).to_contain_text("next wave in",
                                                                    timeout=WAIT_MS)
    page.get_by_role("button", name="Pause").click()
    expect(page.locator('[data-field="state"]')).to_have_text("paused")
    assert site.get(f"/api/v1/rollouts/{rollout}")["state"] == "paused"
    expect(page.get_by_role("button", name="Pause")).to_be_hidden()
    expect(page.locator('[data-field="reason"]')).to_have_text("paused by admin")
    site.shot(page, "rollout-paused")
    page.get_by_role("button", name="Resume").click()
    expect(page.locator('[data-field="state"]')).to_have_text(re.compile("running|completed"))
    expect(page.locator('[data-field="state"]')).to_have_text("completed", timeout=WAIT_MS)
    assert site.get(f"/api/v1/rollouts/{rollout}")["state"] == "completed"
    audit = [e["action"] for e in site.get("/api/v1/audit", limit=200) if e["target"] == rollout]
    assert {"rollout.pause", "rollout.resume", "rollout.paused", "rollout.running"} <= set(audit)


def test_a_failed_device_shows_its_error(site: Site, page: Page) -> None:
    rollout = _create_rollout(page, site, **{"Model": "tiny", "Version": "2",
                                             "Target tags": "ring=bad"})
    failed = page.locator("#failed-rows tr", has_text=site.bad)
    expect(failed).to_contain_text("self-test failed", timeout=WAIT_MS)
    expect(page.locator('[data-field="state"]')).to_have_text("paused")
    expect(page.locator('[data-field="reason"]')).to_contain_text("more than --max-failures 0")
    api_error = site.get(f"/api/v1/rollouts/{rollout}")["failed_devices"][0]["error"]
    assert failed.locator("td.error").inner_text() == api_error
    site.shot(page, "rollout-failed")
    failed.get_by_role("link").click()
    expect(page.locator("td.error", has_text="self-test failed").first).to_be_visible()


def test_hostile_names_and_tags_are_shown_as_text(site: Site, page: Page) -> None:
    page.goto(f"{site.hub.url}/ui/fleet?q=script")
    link = page.locator("a.device-link")
    expect(link).to_have_text(HOSTILE)
    assert page.locator("script:not([src])").count() == 0
    expect(page.locator("td.tags")).to_contain_text(f"note={HOSTILE_TAG}")
    assert page.locator("img").count() == 0
    link.click()
    expect(page.locator("#device-name")).to_have_text(HOSTILE)
    assert page.title().startswith(HOSTILE)
    assert "&lt;script&gt;" in page.content()
    # The tab's dialog handler (fixture) fails the test had any alert() run.


def test_a_viewer_sees_no_buttons_and_forged_posts_are_refused(
        site: Site, browser: Browser, page: Page) -> None:
    rollout = site.get("/api/v1/rollouts")[0]["id"]  # the paused one with the failed device
    with browser.new_context(ignore_https_errors=HUB_CA_NOT_IN_CHROMIUM) as context:
        viewer = context.new_page()
        sign_in(viewer, site.hub.url, site.viewer_token)
        viewer.goto(f"{site.hub.url}/ui/rollouts/{rollout}")
        expect(viewer.locator("h1")).to_contain_text(rollout)
        assert viewer.locator("form[data-when]").count() == 0
        viewer.goto(f"{site.hub.url}/ui/rollouts")
        assert viewer.get_by_role("button", name="Start rollout").count() == 0
        site.shot(viewer, "viewer-rollouts")
        # The viewer's own session and CSRF token, posting what the page did not offer.
        csrf = viewer.locator('form[action="/ui/signout"] input[name="csrf"]').get_attribute(
            "value")
        answer = viewer.request.post(f"{site.hub.url}/ui/rollouts/{rollout}/resume",
                                     form={"csrf": str(csrf)})
        assert answer.status == 403 and "needs the operator role" in answer.text()
    with site.api(site.viewer_token) as api:
        assert api.post(f"/api/v1/rollouts/{rollout}/resume").status_code == 403

    # An operator's session without the CSRF token, or sent from another site's page.
    page.goto(f"{site.hub.url}/ui/rollouts/{rollout}")
    csrf = page.locator('form[action="/ui/signout"] input[name="csrf"]').get_attribute("value")
    forged = page.request.post(f"{site.hub.url}/ui/rollouts/{rollout}/resume", form={})
    assert forged.status == 403 and "CSRF" in forged.text()
    wrong = page.request.post(f"{site.hub.url}/ui/rollouts/{rollout}/resume",
                              form={"csrf": "0" * 64})
    assert wrong.status == 403
    elsewhere = page.request.post(f"{site.hub.url}/ui/rollouts/{rollout}/resume",
                                  form={"csrf": str(csrf)},
                                  headers={"Origin": "http://evil.example"})
    assert elsewhere.status == 403
    assert site.get(f"/api/v1/rollouts/{rollout}")["state"] == "paused"  # nothing changed
    denied = [(e["actor"], e["status"]) for e in site.get("/api/v1/audit", limit=200)
              if (e["action"], e["target"], e["result"]) == ("rollout.resume", rollout, "denied")]
    assert sorted(denied) == [("admin", 403)] * 3 + [("watcher", 403)]


def test_the_audit_log_filters_and_the_models_page_shows_where_versions_run(
        site: Site, page: Page) -> None:
    page.goto(f"{site.hub.url}/ui/audit")
    page.get_by_label("Action starts with").fill("rollout.create")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("table.audit tbody tr")
    assert rows.count() >= 4
    assert set(rows.locator("td:nth-child(3)").all_inner_texts()) == {"rollout.create"}
    page.get_by_label("Action starts with").fill("")
    page.get_by_label("Result").select_option("denied")
    page.get_by_role("button", name="Filter").click()
    assert set(rows.locator("td:nth-child(5)").all_inner_texts()) <= {
        "denied 401", "denied 403"}
    site.shot(page, "audit")

    page.goto(f"{site.hub.url}/ui/models")
    page.get_by_role("link", name="tiny").click()
    version2 = page.locator("article.version", has_text="tiny:2")
    expect(version2).to_contain_text("signed")
    expect(version2).to_contain_text("stage=prod")
    expect(version2).to_contain_text("git_commit: 0123abc")
    # Version 2 serves on the four good devices (and rolled back on the bad one).
    expect(version2.locator("dd", has_text="serving")).to_contain_text("4")
    site.shot(page, "model")


def test_the_pages_fit_a_phone(site: Site, browser: Browser) -> None:
    with browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                             ignore_https_errors=HUB_CA_NOT_IN_CHROMIUM,
                             has_touch=True, device_scale_factor=2) as context:
        phone = context.new_page()
        sign_in(phone, site.hub.url, site.hub.admin_token)
        for path in ("/ui/fleet", f"/ui/devices/{site.good[0]}?window=15m"):
            phone.goto(site.hub.url + path)
            # Nothing wider than the screen but the tables, which scroll in their own box.
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390 + 1
        site.shot(phone, "phone-device", full_page=False)
        phone.keyboard.press("Tab")  # the first stop is the skip link
        assert phone.evaluate("document.activeElement.textContent") == "Skip to content"
