"""The dashboard at `/` (to browsers) and `/dashboard`: one static page (dashboard.html, plain
JS and SVG, nothing loaded from elsewhere) that polls `/health` and `/v1/cache/misses` every
second while it is visible. The server does nothing for it between requests, so it costs
nothing when nobody looks. The Host/Origin guard and the API key apply as to every route:
with `--api-key` the page asks for the key and keeps it in sessionStorage only.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import HTMLResponse

router = APIRouter()
# The page holds no data (it fetches it, with the key), so it can be served without the key;
# it may not be framed or run scripts from elsewhere.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@cache
def _html() -> str:
    return (Path(__file__).with_name("dashboard.html")).read_text(encoding="utf-8")


def wants_page(request: Request) -> bool:
    """A browser asks for HTML; API clients (Claude Code's probe) ask for JSON or anything."""
    return "text/html" in request.headers.get("accept", "")


def page() -> HTMLResponse:
    return HTMLResponse(_html(), headers=HEADERS)


@router.api_route("/dashboard", methods=["GET", "HEAD"], include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return page()
