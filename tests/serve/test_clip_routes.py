"""`gpa_ray.serve.routes.clips` served on its own over the in-process backend: a clip's
record points at its audio, the audio is the stored FLAC, unknown ids get a 404."""

from __future__ import annotations

import requests

from gpa_ray.serve.routes import clips


def test_clip_routes_alone_give_records_and_audio(
    serve_router, check_bad_requests, served_index
) -> None:
    url = serve_router(clips.router)
    check_bad_requests(url, "/v1/clips/", "/v1/audio/")
    for clip in served_index["clips"][:2]:
        record = requests.get(f"{url}/v1/clips/{clip['clip_id']}").json()
        assert (record["clip_id"], record["labels"]) == (clip["clip_id"], clip["labels"])
        audio = requests.get(url + record["audio_url"])
        assert audio.headers["content-type"] == "audio/flac"
        assert audio.content == clip["audio"]
        assert audio.headers["accept-ranges"] == "bytes"
    # Byte ranges, as a browser asks to seek: a span, an open end, a suffix, and one past
    # the end refused with the size; several ranges get the whole file.
    clip = served_index["clips"][1]
    data, path = clip["audio"], url + record["audio_url"]
    size = len(data)
    for asked, first, last in (
        ("bytes=10-99", 10, 99),
        ("bytes=100-", 100, size - 1),
        ("bytes=-50", size - 50, size - 1),
        (f"bytes=5-{10 * size}", 5, size - 1),
    ):
        part = requests.get(path, headers={"Range": asked})
        assert part.status_code == 206, asked
        assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert part.content == data[first : last + 1]
    beyond = requests.get(path, headers={"Range": f"bytes={size}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"
    assert beyond.json()["error"]["code"] == "range_not_satisfiable"
    several = requests.get(path, headers={"Range": "bytes=0-1,5-6"})
    assert several.status_code == 200 and several.content == data
