"""`gpa_ray.serve.routes.service` served on its own over the in-process backend: health,
the served index's manifest, a reload while LATEST is unchanged, the batch statistics."""

from __future__ import annotations

import requests

from gpa_ray.serve.routes import service


def test_service_routes_alone_report_the_served_index(serve_router, served_index) -> None:
    url = serve_router(service.router)
    health = requests.get(f"{url}/healthz").json()
    assert (health["status"], health["clips"]) == ("ok", len(served_index["clips"]))
    manifest = requests.get(f"{url}/v1/index").json()
    assert manifest["checkpoint"] == served_index["checkpoint"]
    version = health["index_version"]
    reload = requests.post(f"{url}/v1/index/reload").json()
    assert reload == {"previous_version": version, "index_version": version, "changed": False}
    stats = requests.get(f"{url}/v1/stats").json()
    assert set(stats) == {"text", "audio"}
    assert requests.get(f"{url}/v1/search/text").status_code == 404  # not this router's
