"""The whole system on one machine, stage by stage: the README's first command.

corpus (the offline synthetic corpus, or the one the config names) -> ingest (EnCodec codes
+ FLAC audio) -> AudioFormer masked-LM pre-training -> GPA training -> distributed Sinkhorn
text bias -> full-pool evaluation (A2T with and without the bias) -> index build -> the
Ray Serve retriever, queried in both directions.

Every stage is the same library call its `jobs/*.py` entry point makes, with the paths of
one output folder (`quickstart.output`, local or `s3://`) wired from stage to stage, so
each artefact can be inspected (and each stage rerun on its own) afterwards. Stages that
already finished are resumed, not redone, when the command is run again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from gpa_ray import storage
from gpa_ray.config import Config

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXAMPLE_TEXT_QUERIES = ("a high pitched beep repeating quickly", "quiet low noise fading out")


def stage_configs(cfg: Config, output: str) -> dict[str, Config]:
    """One resolved config per stage, every path under `output`."""
    corpus_root = cfg.corpus.root or storage.join(output, "corpus")
    ingest_out = storage.join(output, "ingest")
    runs = storage.join(output, "runs")
    base = dataclasses.replace(
        cfg,
        corpus=dataclasses.replace(cfg.corpus, root=corpus_root),
        ingest=dataclasses.replace(cfg.ingest, output=ingest_out),
    )
    train = dataclasses.replace(base.train, data=ingest_out, storage_path=runs)
    pretrain = dataclasses.replace(
        base,
        train=dataclasses.replace(
            train, name="audioformer_mlm", epochs=cfg.quickstart.pretrain_epochs
        ),
    )
    gpa = dataclasses.replace(base, train=dataclasses.replace(train, name="gpa"))
    return {"base": base, "pretrain": pretrain, "gpa": gpa}


def _timed(name: str, timings: dict[str, float], fn: Callable[[], T]) -> T:
    logger.info("=== %s ===", name)
    started = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - started, 1)
    logger.info("=== %s done in %.1f s ===", name, timings[name])
    return result


def _post_json(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _post_audio(url: str, data: bytes) -> dict[str, Any]:
    request = urllib.request.Request(url, data, {"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def example_queries(url: str, audio_example: tuple[str, bytes] | None, k: int = 3) -> list[str]:
    """Query the running retriever in both directions; printable result lines."""
    lines = []
    for query in EXAMPLE_TEXT_QUERIES:
        hits = _post_json(f"{url}/v1/search/text", {"query": query, "k": k})["results"]
        lines.append(f"text  {query!r}:")
        lines += [f"    {h['score']:+.3f}  {h['clip_id']}  {h['captions'][0]}" for h in hits]
    if audio_example is not None:
        name, data = audio_example
        hits = _post_audio(f"{url}/v1/search/audio?k={k}", data)["results"]
        lines.append(f"audio {name}:")
        lines += [f"    {h['score']:+.3f}  {h['text']}" for h in hits]
    return lines


def _first_test_clip(cfg: Config) -> tuple[str, bytes] | None:
    """A held-out corpus file to use as an audio query."""
    files = storage.list_files(storage.join(cfg.corpus.root, "audio"), ".wav", cfg.storage)
    if not files:
        return None
    return files[-1].rsplit("/", 1)[-1], storage.read_bytes(files[-1], cfg.storage)


def run_quickstart(cfg: Config, serve_app: bool = True) -> dict[str, Any]:
    """Run every stage; returns the summary (also written to `<output>/quickstart.json`)."""
    from gpa_ray.bias_job import run_bias_job
    from gpa_ray.data.ingest import run_ingest
    from gpa_ray.data.synthetic import generate_corpus
    from gpa_ray.evaluation import markdown_table, run_evaluation
    from gpa_ray.index.build import run_build_index
    from gpa_ray.train.audioformer_loops import MLMLoop
    from gpa_ray.train.gpa_loop import train_gpa
    from gpa_ray.train.trainer import fit

    output = cfg.quickstart.output
    configs = stage_configs(cfg, output)
    base = configs["base"]
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"output": output, "timings_s": timings}

    captions = storage.join(base.corpus.root, "captions.csv")
    if base.corpus.kind == "folder" and not storage.exists(captions, base.storage):
        summary["corpus"] = _timed(
            "synthetic corpus",
            timings,
            lambda: generate_corpus(base.synthetic, base.corpus.root, base.storage),
        )
    summary["ingest"] = _timed("ingest", timings, lambda: run_ingest(base))
    pretrain = _timed(
        "audioformer pre-training", timings, lambda: fit(MLMLoop(configs["pretrain"]))
    )
    summary["audioformer"] = pretrain.summary()
    gpa = _timed("gpa training", timings, lambda: train_gpa(configs["gpa"]))
    summary["gpa"] = gpa.summary()
    checkpoint = gpa.best_checkpoint or gpa.checkpoint

    bias_out = storage.join(output, "bias")
    with_bias = dataclasses.replace(
        base,
        sinkhorn=dataclasses.replace(
            base.sinkhorn,
            checkpoint=checkpoint,
            queries=base.ingest.output,
            texts=base.ingest.output,
            output=bias_out,
        ),
        eval=dataclasses.replace(
            base.eval, checkpoint=checkpoint, bias=bias_out, output=storage.join(output, "eval")
        ),
        index=dataclasses.replace(
            base.index, checkpoint=checkpoint, bias=bias_out, output=storage.join(output, "index")
        ),
    )
    summary["bias"] = _timed("sinkhorn bias", timings, lambda: run_bias_job(with_bias))
    summary["eval"] = _timed("evaluation", timings, lambda: run_evaluation(with_bias))
    summary["index"] = _timed("index build", timings, lambda: run_build_index(with_bias))
    if serve_app:
        from gpa_ray.serve.app import start_retriever

        serving = dataclasses.replace(
            with_bias,
            serve=dataclasses.replace(with_bias.serve, index_uri=with_bias.index.output),
        )
        url = _timed("serve", timings, lambda: start_retriever(serving))
        summary["url"] = url
        summary["examples"] = example_queries(url, _first_test_clip(base))
    summary["report"] = [
        f"all artefacts under {output}",
        "stage timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
        f"ingest: {summary['ingest']['clips_ok']} clips ok, "
        f"{summary['ingest']['clips_failed']} failed",
        "",
        markdown_table(summary["eval"]["rows"]),
        *summary.get("examples", []),
    ]
    storage.write_bytes(
        storage.join(output, "quickstart.json"),
        json.dumps(summary, indent=2, default=str).encode(),
        cfg.storage,
    )
    return summary
