"""`gpa_ray.serve.routes.page` served on its own: the packaged search page, kept out of
the OpenAPI schema."""

from __future__ import annotations

import requests

from gpa_ray.serve.routes import page


def test_page_route_alone_serves_the_packaged_page(serve_router) -> None:
    url = serve_router(page.router)
    response = requests.get(url + "/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text == page.page_html() and '<form id="text-form">' in response.text
    assert requests.get(url + "/openapi.json").json()["paths"] == {}
