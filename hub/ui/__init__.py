"""The web dashboard at /ui: fleet, devices, models, rollouts and the audit log.

`install(app)` adds its pages and its static files (CSS, a little JS) to the
hub's FastAPI application: same process, same port, nothing fetched from
elsewhere. The pages are Jinja2 templates with autoescaping on everywhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from hub.ui.routes import router


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=Path(__file__).parent / "static"),
              name="ui-static")
