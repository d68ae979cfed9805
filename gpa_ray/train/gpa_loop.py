"""GPA training as a `TrainLoop`: batches, negatives across workers, losses, evaluation.

Batches (`GPACollate`, on each worker): every clip of a clip shard becomes tower inputs
through `gpa_ray.audio.inputs.AudioInputs` (random crop + SpecAugment when training) and
is paired with ONE of its captions, drawn anew each epoch (`train.pairs_per_epoch=clip`),
or the training stream has one row per (clip, caption) pair and each pair is seen once
per epoch (`caption`, the DP baseline's loader: `gpa_ray.data.loaders.per_caption`); a
share of the captions (`gpa.caption_aug_share`) is augmented (`gpa_ray.data.captions`).
Draws are seeded per (run seed, epoch, clip[, caption index]), never per worker, so a
pair gets the same crop, masks and caption however the batch is split over workers. Two
captions of one clip in a global batch share its `clip_keys`, so neither is the other's
negative. Validation batches carry every caption of every clip, with the clip each
caption belongs to.

Step (`train_step`): both towers run through the (DDP-wrapped) model; with
`train.gather_negatives` the global embeddings AND prototypes of every worker are
gathered with gradients (`gather_with_grad`), and each worker scores its own audio
queries against all texts and its own text queries against all clips with the full GPA
score R = S_g + S'_p (eq 9). The loss (`gpa.loss`: triplet-sum eq 11, NT-Xent eq 12,
InfoNCE, CWCL) covers this worker's rows only, weighted by their share of the global
batch and scaled by the world size (`global_loss_scale`), so that after DDP averages the
gradients the step equals one process training on the whole global batch. Without the
gather, each worker contrasts within its own batch (fewer negatives; a different loss).

Evaluation (`evaluate`): each worker embeds its share of the validation clips and all
their captions; the pool is gathered and every worker scores it block by block
(`GPAModel.score_pool`) into the full table of `gpa_ray.metrics.retrieval_metrics`:
R@1/5/10, mAP@10 and MRR in both directions (reported as `val_t2a_R@1`, ...), and each
direction's R@1 + R@5 + R@10 (`val_t2a_R_sum`: the DP baseline's checkpoint selection).

`train_gpa(cfg)` runs a whole job: Ray Train over the configured clip splits, then
`<run>/summary.json` naming the best checkpoint (by `train.checkpoint_metric`, else
`val_t2a_R@1`) and the latest; `gpa_ray.checkpoints.load_gpa(<run>)` loads the best one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn
from torch import Tensor, nn

from gpa_ray import checkpoints, losses
from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.config import Config, GPAConfig
from gpa_ray.data.captions import (
    CAPTION_AUGMENTATIONS,
    augment_text,
    choose_caption,
    draw_seed,
)
from gpa_ray.data.lexicon import load_lexicon
from gpa_ray.data.loaders import (
    CAPTION_COLUMN,
    CAPTION_INDEX_COLUMN,
    clip_key_tensor,
    codes_from_arrow,
    per_caption,
)
from gpa_ray.metrics import retrieval_metrics
from gpa_ray.models.factory import build_gpa, build_tokenizer, trainable_summary
from gpa_ray.models.gpa import Embeddings, GPAModel
from gpa_ray.models.text import TextEncoder
from gpa_ray.train.distributed import gather_with_grad, global_loss_scale, world_size
from gpa_ray.train.loop import Batch, TrainLoop, gather_rows, sum_across_workers
from gpa_ray.train.param_groups import gpa_param_groups
from gpa_ray.train.trainer import TrainResult, fit
from gpa_ray.train.worker import unwrap

logger = logging.getLogger(__name__)

LOSSES = ("triplet", "nt_xent", "info_nce", "cwcl")
PAIRS_PER_EPOCH = ("clip", "caption")
AUDIO_PREFIX = "audio."
TEXT_PREFIX = "text."
SCORE_BLOCK = 1024


class GPACollate(ArrowBatchCollateFn):
    """Clip-shard Arrow batch (a row per clip, or per (clip, caption) pair) -> audio
    inputs, caption tokens and clip bookkeeping.

    Keys: `audio.<tower kwarg>` (see `AudioInputs.collate`), `text.input_ids`,
    `text.attention_mask`, `clip_keys` [B] (int64 `clip_key` of each clip) and
    `caption_clip` [n_texts] (the batch row of each caption's clip); validation batches
    also carry `caption_keys` [n_texts] (`clip_key` of each caption's text: equal exactly
    for identical texts, which the metrics count as relevant to every clip carrying them).
    """

    def __init__(self, cfg: Config, train: bool, seed: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.train = train
        self.seed = seed
        self.inputs = AudioInputs.from_config(cfg)
        self.tokenizer = build_tokenizer(cfg)

    def _caption(
        self, clip_id: str, captions: list[str] | None, text: str | None, seed: int
    ) -> str:
        """The training text of a row: its own caption (per-caption rows) or one drawn from
        the clip's captions, augmented for a `gpa.caption_aug_share` of the rows."""
        rng = np.random.default_rng(seed)
        if text is None:
            try:
                text = choose_caption(captions or [], rng)
            except ValueError as exc:
                raise ValueError(f"clip {clip_id!r} has no captions to train on") from exc
        gpa = self.cfg.gpa
        if gpa.caption_aug_share > 0 and rng.random() < gpa.caption_aug_share:
            text = augment_text(gpa, text, rng)
        return text

    def pair_texts(self, table: pa.Table) -> tuple[list[str], list[int], list[int]]:
        """(texts, batch row of each text's clip, the draw seed of each row).

        Training: one text per row; per-caption rows (`caption` column) keep their own and
        draw per (clip, caption index), so a clip's five pairs get five crops and masks.
        Validation: every caption of every clip."""
        clip_ids = [str(c) for c in table.column("clip_id").to_pylist()]
        if CAPTION_COLUMN in table.column_names:
            own = table.column(CAPTION_COLUMN).to_pylist()
            index = table.column(CAPTION_INDEX_COLUMN).to_pylist()
            seeds = [draw_seed(self.seed, c, i) for c, i in zip(clip_ids, index, strict=True)]
            captions: list[Any] = [None] * len(clip_ids)
        else:
            own = [None] * len(clip_ids)
            seeds = [draw_seed(self.seed, clip_id) for clip_id in clip_ids]
            captions = table.column("captions").to_pylist()
        if self.train:
            texts = [
                self._caption(c, caps, text, s)
                for c, caps, text, s in zip(clip_ids, captions, own, seeds, strict=True)
            ]
            return texts, list(range(len(texts))), seeds
        if CAPTION_COLUMN in table.column_names:
            raise ValueError("validation batches need the clips' `captions` lists")
        texts = [text for caps in captions for text in caps or []]
        caption_clip = [row for row, caps in enumerate(captions) for _ in caps or []]
        return texts, caption_clip, seeds

    def __call__(self, table: pa.Table) -> Batch:
        clip_ids = [str(c) for c in table.column("clip_id").to_pylist()]
        texts, caption_clip, seeds = self.pair_texts(table)
        if self.inputs.needs_codes:
            codes = codes_from_arrow(table.column("codes"))
            items = [
                self.inputs.from_codes(c, self.train, s) for c, s in zip(codes, seeds, strict=True)
            ]
        else:
            audio = table.column("audio").to_pylist()
            items = [
                self.inputs.from_row({"clip_id": c, "audio": a}, self.train, s)
                for c, a, s in zip(clip_ids, audio, seeds, strict=True)
            ]
        batch: Batch = {AUDIO_PREFIX + k: v for k, v in self.inputs.collate(items).items()}
        batch.update({TEXT_PREFIX + k: v for k, v in self._tokenize(texts).items()})
        batch["clip_keys"] = clip_key_tensor(clip_ids)
        batch["caption_clip"] = torch.tensor(caption_clip, dtype=torch.long)
        if not self.train:
            batch["caption_keys"] = clip_key_tensor(texts)
        return batch

    def _tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        if not texts:
            empty = torch.zeros(0, 1, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        tokens = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.cfg.text.max_length,
            return_tensors="pt",
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def split_batch(batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(audio tower kwargs, text token tensors) of a collated batch."""
    audio = {k[len(AUDIO_PREFIX) :]: v for k, v in batch.items() if k.startswith(AUDIO_PREFIX)}
    text = {k[len(TEXT_PREFIX) :]: v for k, v in batch.items() if k.startswith(TEXT_PREFIX)}
    return audio, text


def gather_embeddings(emb: Embeddings) -> tuple[Embeddings, int]:
    """Every worker's embeddings (global and prototypes), differentiably, and the offset
    of this worker's first row in them."""
    global_, offset = gather_with_grad(emb.global_)
    if emb.prototypes is None:
        return Embeddings(global_), offset
    prototypes, _ = gather_with_grad(emb.prototypes)
    return Embeddings(global_, prototypes), offset


def retrieval_loss(
    kind: str,
    gpa: GPAConfig,
    sim: Tensor,
    sim_t2a: Tensor,
    positive: Tensor,
    clip_keys: Tensor,
    text_features: Tensor | None = None,
) -> Tensor:
    """The configured loss over local query rows x global keys (rectangular forms)."""
    common = {"sim_t2a": sim_t2a, "positive_index": positive, "clip_ids": clip_keys}
    if kind == "triplet":
        return losses.triplet_sum_loss(sim, gpa.margin, **common)
    if kind == "nt_xent":
        return losses.nt_xent_loss(sim, gpa.temperature, **common)
    if kind == "info_nce":
        # Eq 1 of "Good, Fast, Cheap": audio-to-text only, scale 1 (no gpa.temperature).
        return losses.info_nce_loss(sim, positive_index=positive, clip_ids=clip_keys)
    if kind == "cwcl":
        if text_features is None:
            raise ValueError("the cwcl loss needs the text encoder's features")
        return losses.cwcl_loss(sim, text_features, gpa.temperature, **common)
    raise ValueError(f"unknown gpa.loss {kind!r}; choose one of {LOSSES}")


def contrastive_step(
    net: GPAModel,
    audio_emb: Embeddings,
    text_emb: Embeddings,
    clip_keys: Tensor,
    gpa: GPAConfig,
    gather: bool,
    text_features: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss to back-propagate on this worker, loss of the whole step for logging).

    With `gather`, this worker's rows are scored against every worker's rows and its loss
    is its rows' share of the global-batch loss times the world size (see the module
    docstring); the logged value is the global-batch loss itself. Without it, the worker's
    loss is its own in-batch loss, and the logged value is the mean over workers.
    """
    n_local = len(audio_emb)
    if gather:
        audio_all, offset = gather_embeddings(audio_emb)
        text_all, _ = gather_embeddings(text_emb)
        keys_all = gather_rows(clip_keys)
        features = None if text_features is None else gather_rows(text_features)
    else:
        audio_all, text_all, offset, keys_all, features = (
            audio_emb,
            text_emb,
            0,
            clip_keys,
            text_features,
        )
    sim = net.score(audio_emb, text_all).float()
    sim_t2a = net.score(audio_all, text_emb).T.float()
    positive = offset + torch.arange(n_local, device=sim.device)
    local = retrieval_loss(gpa.loss, gpa, sim, sim_t2a, positive, keys_all, features)
    if gather:
        contribution = local * (n_local / len(audio_all))
        logged = sum_across_workers(contribution.detach())
        return contribution * global_loss_scale(), logged
    return local, sum_across_workers(local.detach()) / world_size()


class GPALoop(TrainLoop):
    """GPA (or, with `gpa.scorer=none`, the DP baseline) on clip shards with captions."""

    task = "gpa"
    metric = "val_t2a_R@1"
    metric_mode = "max"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        if cfg.gpa.loss not in LOSSES:
            raise ValueError(f"unknown gpa.loss {cfg.gpa.loss!r}; choose one of {LOSSES}")
        if not 0.0 <= cfg.gpa.caption_aug_share <= 1.0:
            raise ValueError("gpa.caption_aug_share must lie in [0, 1]")
        if cfg.gpa.caption_aug not in CAPTION_AUGMENTATIONS:
            raise ValueError(
                f"unknown gpa.caption_aug {cfg.gpa.caption_aug!r}; "
                f"choose one of {CAPTION_AUGMENTATIONS}"
            )
        if cfg.gpa.caption_aug == "lexical" and cfg.gpa.caption_aug_share > 0:
            load_lexicon(cfg.gpa.lexicon_wordnet, cfg.gpa.lexicon_misspellings)  # fail early
        if cfg.train.pairs_per_epoch not in PAIRS_PER_EPOCH:
            raise ValueError(
                f"unknown train.pairs_per_epoch {cfg.train.pairs_per_epoch!r}; "
                f"choose one of {PAIRS_PER_EPOCH}"
            )
        audio_column = "codes" if cfg.audio_encoder.kind == "audioformer" else "audio"
        self.columns = ("clip_id", "captions", audio_column)
        self.locked_text: TextEncoder | None = None

    def build_model(self) -> nn.Module:
        model = build_gpa(self.cfg)
        if self.cfg.train.init_from:
            start = checkpoints.resolve_checkpoint(
                self.cfg.train.init_from, "latest", self.cfg.storage
            )
            model.load_state_dict(checkpoints.load_model_state(start, self.cfg.storage))
        logger.info("GPA parameters: %s", trainable_summary(model))
        # CWCL's locked text tower: a frozen copy of the starting weights, kept beside the
        # model (not trained, not checkpointed; a resumed worker rebuilds the same copy).
        self.locked_text = model.text_encoder.locked() if self.cfg.gpa.loss == "cwcl" else None
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam; the audio tower's early blocks at a smaller lr when configured."""
        return torch.optim.Adam(gpa_param_groups(model, self.cfg), lr=self.cfg.train.lr)

    def train_dataset(self, dataset: Any) -> Any:
        """One row per (clip, caption) with `train.pairs_per_epoch=caption`."""
        return per_caption(dataset) if self.cfg.train.pairs_per_epoch == "caption" else dataset

    def collate_fn(self, train: bool, epoch: int = 0) -> GPACollate:
        """Training draws depend on (run seed, epoch, clip) only, so they change every
        epoch and a resumed run repeats them exactly; validation inputs never change."""
        if not train:
            return GPACollate(self.cfg, False, draw_seed(self.cfg.train.seed, "val"))
        return GPACollate(self.cfg, True, draw_seed(self.cfg.train.seed, "train", epoch))

    def text_features(self, text: dict[str, Tensor]) -> Tensor | None:
        """CWCL's weights come from the locked text tower (see `build_model`), whatever the
        trainable tower has learnt since; None for the other losses."""
        if self.cfg.gpa.loss != "cwcl":
            return None
        if self.locked_text is None:
            raise RuntimeError("the cwcl loss needs the locked text tower: call build_model first")
        locked = self.locked_text.to(text["input_ids"].device)
        with torch.no_grad():
            return locked.encode_tokens(text["input_ids"], text["attention_mask"]).global_

    def train_step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        audio, text = split_batch(batch)
        audio_emb, text_emb = model(audio, text)
        net = unwrap(model)
        loss, logged = contrastive_step(
            net,
            audio_emb,
            text_emb,
            batch["clip_keys"],
            self.cfg.gpa,
            self.cfg.train.gather_negatives,
            self.text_features(text),
        )
        return loss, {"loss": float(logged)}

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        # The unwrapped model: DDP's forward may synchronise buffers, a collective that
        # would hang when workers hold different numbers of validation batches.
        net: GPAModel = unwrap(model)
        audio_parts: list[Embeddings] = []
        text_parts: list[Embeddings] = []
        owners: list[Tensor] = []
        text_keys: list[Tensor] = []
        n_clips = 0
        for batch in batches:
            audio, text = split_batch(batch)
            audio_parts.append(net.embed_audio(audio))
            if batch["caption_clip"].numel():
                text_parts.append(net.embed_text(text))
                owners.append(batch["caption_clip"] + n_clips)
                text_keys.append(batch["caption_keys"])
            n_clips += len(audio_parts[-1])
        device = next(net.parameters()).device
        audio_pool, offset = self._gather_pool(audio_parts, device)
        text_pool, _ = self._gather_pool(text_parts, device)
        local_owners = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long)
        caption_to_clip = gather_rows(local_owners.to(device) + offset).cpu()
        local_keys = torch.cat(text_keys) if text_keys else torch.zeros(0, dtype=torch.long)
        caption_keys = gather_rows(local_keys.to(device)).cpu().tolist()
        scores = net.score_pool(audio_pool, text_pool, SCORE_BLOCK).float().cpu()
        return with_recall_sums(
            retrieval_metrics(
                scores,
                caption_to_clip=caption_to_clip,
                ties=self.cfg.eval.ties,
                caption_texts=caption_keys,
            )
        )

    def _gather_pool(self, parts: list[Embeddings], device: torch.device) -> tuple[Embeddings, int]:
        """Concatenate this worker's embeddings and gather every worker's (no gradient)."""
        if parts:
            local = Embeddings.cat(parts)
        else:
            gpa = self.cfg.gpa
            protos = None
            if gpa.scorer != "none":
                protos = torch.zeros(0, gpa.n_prototypes + 1, gpa.embed_dim, device=device)
            local = Embeddings(torch.zeros(0, gpa.embed_dim, device=device), protos)
        with torch.no_grad():
            pool, offset = gather_embeddings(local)
        return pool.detach(), offset


def with_recall_sums(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` plus `<direction>_R_sum` = R@1 + R@5 + R@10 of each direction present.

    The DP baseline's code (which GPA follows) keeps the epoch with the highest validation
    T2A R@1 + R@5 + R@10: `train.checkpoint_metric=val_t2a_R_sum` selects the same way."""
    out = dict(metrics)
    for direction in ("t2a", "a2t"):
        keys = [f"{direction}_R@{k}" for k in (1, 5, 10)]
        if all(k in metrics for k in keys):
            out[f"{direction}_R_sum"] = sum(float(metrics[k]) for k in keys)
    return out


def train_gpa(cfg: Config, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Train (or resume) the GPA run the config names; write `<run>/summary.json`.
    `callbacks`: Ray Train callbacks (`gpa_ray.train.trainer.build_trainer`)."""
    result = fit(GPALoop(cfg), callbacks=callbacks)
    checkpoints.write_run_summary(result.run_uri, result.summary(), cfg.storage)
    return result


def metrics_table(metrics: dict[str, Any]) -> str:
    """The retrieval table of an epoch record (`val_t2a_R@1`, ...) as aligned text."""
    columns = ["R@1", "R@5", "R@10", "mAP@10", "MRR"]
    lines = [f"{'':5}" + "".join(f"{c:>9}" for c in columns)]
    for direction in ("t2a", "a2t"):
        values = [metrics.get(f"val_{direction}_{c}") for c in columns]
        if all(v is None for v in values):
            continue
        cells = "".join(f"{'-':>9}" if v is None else f"{100 * v:9.2f}" for v in values)
        lines.append(f"{direction:5}{cells}")
    return "\n".join(lines)
