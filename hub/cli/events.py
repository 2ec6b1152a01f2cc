"""`edgefleet events` (list and --follow) and `edgefleet webhook ...`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import httpx

from agent.mqtt import BackoffPolicy
from hub.cli.output import (
    client,
    emit,
    emit_one,
    hub_options,
    json_option,
    parse_pairs,
    printable,
    say,
)

if TYPE_CHECKING:
    from hub.cli.client import HubClient

COLUMNS = ["id", "at", "type", "subject", "actor", "detail"]
# Reconnecting to the stream: soon after a blip, no faster than every 15 s while the hub
# is away (a restart takes seconds).
RECONNECT = BackoffPolicy(initial=0.5, maximum=15.0)


def parse_stream(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The events of a server-sent event stream, as the hub's JSON; comments (the
    keep-alives) and `retry:` are skipped."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield json.loads("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def _print(event: dict[str, Any], *, as_json: bool, terminal: bool) -> None:
    if as_json:  # one object a line: JSON escapes every control character itself
        click.echo(json.dumps(event))
    elif terminal:
        say((event["id"], "dim"), " ", (event["at"], "dim"), " ", (event["type"], "bold"), " ",
            event["subject"], " ", (event["actor"], "cyan"), " ", event["detail"])
    else:  # for grep and awk: tab-separated, anyone's text escaped
        click.echo("\t".join(printable(str(event[c])) for c in COLUMNS))
    sys.stdout.flush()  # a pipe is block-buffered: a follower wants each line as it comes


@click.command()
@click.option("--type", "types", multiple=True, metavar="PATTERN",
              help="Only these event types; globs like rollout.* (repeatable).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000),
              help="Newest events to show (with --after: the oldest after it).")
@click.option("--after", type=click.IntRange(0), metavar="SEQ",
              help="Only events after this seq (page on with the last one shown).")
@click.option("--follow", "-f", is_flag=True,
              help="Then print new events as they happen, reconnecting when the hub "
              "goes away and resuming after the last one printed (Ctrl-C stops).")
@hub_options
@json_option
def events(types: tuple[str, ...], limit: int, after: int | None, follow: bool,
           hub: str | None, token: str | None, as_json: bool) -> None:
    """Show the hub's events: models, packages, devices, rollouts, tokens, webhooks, keys.

    With --follow, one line per event (tab-separated when not on a terminal, one
    JSON object a line with --json).

    \b
    Example: edgefleet events --type 'rollout.*' --follow
    """
    api = client(hub, token)
    params = {"type": list(types), "limit": limit, "after": after}
    page = api.get("/api/v1/events", params=params)
    if not follow:
        if as_json:
            click.echo(json.dumps(page["events"], indent=2))
        else:
            emit(page["events"], COLUMNS, as_json=False)
        return
    terminal = sys.stdout.isatty()
    for event in page["events"]:
        _print(event, as_json=as_json, terminal=terminal)
    _follow(api, list(types), page["last"], as_json=as_json, terminal=terminal)


def _follow(api: HubClient, types: list[str], last: int, *, as_json: bool, terminal: bool) -> None:
    failures = 0
    while True:
        try:
            with api.follow("/api/v1/events", params={"type": types}, timeout=httpx.Timeout(
                    60.0, connect=10.0), headers={"Accept": "text/event-stream",
                                                 "Last-Event-ID": str(last)}) as response:
                failures = 0
                for event in parse_stream(response.iter_lines()):
                    _print(event, as_json=as_json, terminal=terminal)
                    last = event["id"]
            why = "the hub closed the stream"
        except httpx.TransportError as exc:
            why = printable(str(exc)) or type(exc).__name__
        except KeyboardInterrupt:
            return
        wait = RECONNECT.delay(failures)
        failures += 1
        click.echo(f"events: {why}; reconnecting in {wait:.1f} s, after event {last}",
                   err=True)
        try:
            time.sleep(wait)
        except KeyboardInterrupt:
            return


@click.group()
def webhook() -> None:
    """Webhooks: events POSTed to your URLs, signed, retried (admin only)."""


@webhook.command("add")
@click.argument("url")
@click.option("--type", "types", multiple=True, required=True, metavar="PATTERN",
              help="Event types to send; globs like rollout.* (repeatable).")
@click.option("--filter", "filters", multiple=True, metavar="FIELD=GLOB",
              help="Only events whose subject or actor matches, e.g. subject=r-* "
              "(repeatable).")
@click.option("--secret-file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The HMAC-SHA256 key the receiver checks Edgefleet-Signature with "
              "(16-512 characters, e.g. from `openssl rand -hex 32`).")
@hub_options
@json_option
def webhook_add(url: str, types: tuple[str, ...], filters: tuple[str, ...], secret_file: Path,
                hub: str | None, token: str | None, as_json: bool) -> None:
    """Subscribe URL to events from now on.

    \b
    Example: edgefleet webhook add https://ci.lan/hook --type 'rollout.*' --secret-file s
    """
    secret = secret_file.read_text().strip()
    record = client(hub, token).post("/api/v1/webhooks", json={
        "url": url, "types": list(types), "filter": parse_pairs(filters, "--filter"),
        "secret": secret})
    if as_json:
        emit_one(record, as_json=True)
    else:
        say(f"Webhook {record['id']} sends {', '.join(record['types'])} to {record['url']}")


@webhook.command("list")
@hub_options
@json_option
def webhook_list(hub: str | None, token: str | None, as_json: bool) -> None:
    """List webhooks with their pending, delivered and dead deliveries.

    \b
    Example: edgefleet webhook list
    """
    rows = client(hub, token).get("/api/v1/webhooks")
    emit(rows, ["id", "url", "types", "filter", "pending", "delivered", "dead", "created_by"],
         as_json=as_json)


@webhook.command("remove")
@click.argument("webhook_id")
@hub_options
@json_option
def webhook_remove(webhook_id: str, hub: str | None, token: str | None, as_json: bool) -> None:
    """Remove a webhook; what it still owed is not sent.

    \b
    Example: edgefleet webhook remove wh-1a2b3c4d
    """
    record = client(hub, token).delete(f"/api/v1/webhooks/{webhook_id}").json()
    if as_json:
        emit_one(record, as_json=True)
    else:
        say(f"Removed {record['id']} ({record['url']})")


@webhook.command("deliveries")
@click.argument("webhook_id")
@click.option("--state", type=click.Choice(["pending", "delivered", "dead"]),
              help="Only these; dead: the dead letters, to replay.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@hub_options
@json_option
def webhook_deliveries(webhook_id: str, state: str | None, limit: int, hub: str | None,
                       token: str | None, as_json: bool) -> None:
    """A webhook's deliveries, newest first: attempts, last answer, next try.

    \b
    Example: edgefleet webhook deliveries wh-1a2b3c4d --state dead
    """
    rows = client(hub, token).get(f"/api/v1/webhooks/{webhook_id}/deliveries",
                                  params={"state": state, "limit": limit})
    emit(rows, ["id", "event_seq", "event_type", "subject", "state", "attempts", "last_status",
                "last_error", "next_at"], as_json=as_json)


@webhook.command("replay")
@click.argument("webhook_id")
@click.option("--delivery", "ids", multiple=True, type=int, metavar="ID",
              help="Only this delivery, dead or delivered (repeatable); default: every "
              "dead letter.")
@hub_options
@json_option
def webhook_replay(webhook_id: str, ids: tuple[int, ...], hub: str | None, token: str | None,
                   as_json: bool) -> None:
    """Send deliveries again, from a first attempt.

    \b
    Example: edgefleet webhook replay wh-1a2b3c4d
    """
    answer = client(hub, token).post(f"/api/v1/webhooks/{webhook_id}/replay",
                                     json={"deliveries": list(ids)})
    if as_json:
        emit_one(answer, as_json=True)
    else:
        say(f"Queued {answer['queued']} delivery(ies) of {webhook_id} again")
