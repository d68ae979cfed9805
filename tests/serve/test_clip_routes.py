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
