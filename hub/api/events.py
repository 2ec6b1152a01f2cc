"""GET /api/v1/events: the event listing, in pages, or a server-sent event stream.

One path, two answers: `Accept: text/event-stream` gets the stream, anything else
a page of JSON. The stream starts after `Last-Event-ID` (what a reconnecting
EventSource sends), else after `?after=`, else at the newest event; each event is
`id: SEQ`, `event: TYPE`, `data: JSON` (hub/events.py's shape). A comment line
every `HEARTBEAT` seconds lets clients and proxies see a quiet stream is alive,
and every `RECHECK` seconds the token is checked again: a revoked or expired one
ends its stream.
The stream reads the database every `POLL` seconds (an index seek on seq), so it
needs nothing from the writers, and ends when the hub stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from hub import events, tokens
from hub.api import auth
from hub.api.state import HubState, hub_state
from hub.errors import Forbidden, Unauthorized
from hub.events import BadPattern, Event
from hub.tokens import Principal
from hub.validation import InvalidInput

router = APIRouter(prefix="/api/v1", tags=["events"])
POLL: Final = 0.25
HEARTBEAT: Final = 15.0
RECHECK: Final = 5.0  # seconds between checks that the stream's token still may read
SEQ_MAX: Final = 2**62
STREAM: Final = "text/event-stream"


class EventPage(BaseModel):
    events: list[Event] = Field(description="oldest first")
    last: int = Field(description="the highest seq given so far: page on with ?after=")


def _types(patterns: Sequence[str]) -> list[str]:
    try:
        return events.types_matching(events.check_patterns(patterns))
    except BadPattern as exc:
        raise InvalidInput(str(exc)) from None


def _frame(event: Event) -> str:
    # JSON has no raw newlines, so the data is one line, as SSE needs.
    return f"id: {event.id}\nevent: {event.type}\ndata: {event.to_json()}\n\n"


async def _stream(state: HubState, cursor: int, types: list[str],
                  allowed: Callable[[], bool]) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    quiet_since = checked = time.monotonic()
    while not state.stopping():
        if time.monotonic() - checked >= RECHECK:
            if not await run_in_threadpool(allowed):
                return  # the client's reconnect gets the 401 or 403 that says why
            checked = time.monotonic()
        found = await run_in_threadpool(events.after, state.db, cursor, types=types,
                                        limit=500)
        for event in found:
            yield _frame(event)
        if found:
            cursor, quiet_since = found[-1].id, time.monotonic()
            continue
        if time.monotonic() - quiet_since >= HEARTBEAT:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(POLL)


@router.get(
    "/events", response_model=EventPage,
    summary="Events, oldest first: a page of JSON, or a server-sent event stream",
    description="With `Accept: text/event-stream`: a stream of every event after "
    "`Last-Event-ID` (or `after`, or from now), each `id: SEQ`, `event: TYPE`, `data: "
    "<the event's JSON>`. Otherwise a page: events after `after`, or without it the "
    "newest `limit` (before `before`, to page back).",
    responses={200: {"content": {STREAM: {"schema": {"type": "string"}}}}},
)
def list_events(
    request: Request,
    types: list[str] = Query([], alias="type", max_length=events.MAX_PATTERNS,
                             description="event type or pattern, e.g. rollout.*; repeatable"),
    after: int | None = Query(None, ge=0, le=SEQ_MAX, description="only events after seq"),
    before: int | None = Query(None, ge=0, le=SEQ_MAX,
                               description="without after: the newest before this seq"),
    limit: int = Query(100, ge=1, le=1000),
    last_event_id: str | None = Header(None, max_length=20,
                                       description="resume a stream after this seq"),
    principal: Principal = auth.viewer,
) -> Any:
    state = hub_state(request)
    wanted = _types(types)
    if STREAM in request.headers.get("accept", ""):
        if last_event_id is not None:
            if not last_event_id.isdigit() or int(last_event_id) > SEQ_MAX:
                raise InvalidInput(f"Last-Event-ID must be an event seq, got "
                                   f"{last_event_id[:20]!r}")
            after = int(last_event_id)
        start = after if after is not None else events.last_seq(state.db)
        secret = request.headers.get("authorization", "").partition(" ")[2].strip()

        def allowed() -> bool:
            try:
                tokens.authenticate(state.db, secret).require("viewer")
            except (Unauthorized, Forbidden):
                return False
            return True

        return StreamingResponse(_stream(state, start, wanted, allowed), media_type=STREAM,
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})
    page = events.after(state.db, after, types=wanted, limit=limit) if after is not None \
        else events.newest(state.db, before=before, types=wanted, limit=limit)
    last = page[-1].id if page else after if after is not None else events.last_seq(state.db)
    return {"events": page, "last": last}
