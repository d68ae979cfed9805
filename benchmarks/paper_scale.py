"""Paper presets at full model size on CPU: two training steps each, step time and peak RSS.

    python benchmarks/paper_scale.py [--presets audiocaps_gpa clotho_gpa audioset_audioformer
        fsd50k_audioformer clotho_gfc_resnet50 clotho_gfc_vit_b16 clotho_gfc_cnn14]
        [--batch N] [--threads 2] [--out benchmarks/results]

Each preset runs in its own process (`gpa_ray.testing.paper_scale`, the code the slow
test `tests/test_paper_scale.py` runs): what the preset's job builds, at its size, with
the per-worker batch cut to `--batch` (default `CPU_BATCH`), on `--threads` torch
threads, weights random where the published ones cannot be had here (BERT-base,
RoBERTa-base with a stand-in tokenizer, PANNs ResNet-38 and CNN14, ResNet-50, ViT-B/16,
EnCodec). Reported per
preset: parameters, wall and CPU seconds of each of the two steps, RSS before and after
building the model and the process's peak RSS. Wall time on a machine shared with other
work measures the neighbours too (the load average is recorded); CPU seconds less so.
Printed and written to `<out>/paper_scale.json`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from gpa_ray.testing.paper_scale import CPU_BATCH, PAPER_PRESETS, run_in_subprocess


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PAPER_PRESETS))
    parser.add_argument("--batch", type=int, default=0, help="0: CPU_BATCH per preset")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            batch = args.batch or CPU_BATCH[preset]
            result = run_in_subprocess(preset, Path(tmp) / f"{preset}.json", batch, args.threads)
            results.append(result)
            print(
                f"{preset}: {result['parameters']:,} params, steps {result['step_seconds']} s "
                f"(cpu {result['step_cpu_seconds']} s), peak RSS {result['peak_rss_mb']} MB"
            )
    report = {"settings": vars(args), "presets": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_scale.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
