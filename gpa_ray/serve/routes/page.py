"""The search page (`GET /`), shipped as package data (`gpa_ray/serve/static/index.html`);
left out of the OpenAPI schema, which documents the JSON API only."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


def page_html() -> str:
    """The search page shipped as package data."""
    return (resources.files("gpa_ray.serve") / "static" / "index.html").read_text()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(page_html())
