"""AudioFormer training tasks as `TrainLoop`s: MLM pre-training, FT1 and FT2 fine-tuning.

- `MLMLoop`: one RoFormer per selected codebook (`audioformer.codebooks`, default all 4),
  25% of the codes masked, trained side by side in one run (`CodebookMLM`). Each model
  has its own optimizer parameter group, and gradients are clipped per group, so every
  model gets exactly the update it would get alone. Metric: masked-token accuracy on the
  validation split, with a fixed masking seed so epochs are comparable.
- `FT1Loop`: the codebook-1 backbone (the first of `audioformer.codebooks`) from the
  pre-training checkpoint, mean-pooled, linear classifier; loss
  `audioformer.classification_loss` (LSEP for multi-label; CE for single-label sets).
- `FT2Loop`: FT1 plus the frozen codebook-2..N backbones of the same pre-training
  checkpoint; loss alpha * MLC + (1 - alpha) * MPC. The MPC negatives span the global
  batch: code views are gathered from every worker with gradients.

Metrics: accuracy and mAP for single-label data, mAP for multi-label data.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpa_ray import checkpoints
from gpa_ray.config import AudioFormerConfig, Config
from gpa_ray.data.loaders import IGNORE_LABEL, CodesCollate, LabelSpace
from gpa_ray.losses import CLASSIFICATION_LOSSES, classification_loss, mpc_loss
from gpa_ray.metrics import classification_metrics
from gpa_ray.models.audioformer import (
    BERT_STYLE,
    IGNORE_INDEX,
    AudioFormerClassifier,
    AudioFormerEncoder,
    AudioFormerFT2,
    AudioFormerMLM,
    mask_tokens,
)
from gpa_ray.train.distributed import gather_with_grad
from gpa_ray.train.loop import Batch, TrainLoop, gather_rows, sum_across_workers

logger = logging.getLogger(__name__)

EVAL_MASK_SEED = 1234


class CodebookMLM(nn.Module):
    """One `AudioFormerMLM` per codebook; `models["c<q>"]` sees codebook q only.

    `forward(input_ids [B, Q, L], attention_mask, labels)` returns the summed loss (what
    is back-propagated: each model's gradient is its own MLM gradient) and, per codebook,
    the mean loss, correct predictions and masked positions.
    """

    def __init__(self, cfg: AudioFormerConfig) -> None:
        super().__init__()
        self.codebooks = list(cfg.codebooks)
        self.models = nn.ModuleDict({f"c{q}": AudioFormerMLM(cfg) for q in self.codebooks})

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
    ) -> dict[str, Tensor]:
        losses, correct, masked = [], [], []
        for slot, q in enumerate(self.codebooks):
            out = self.models[f"c{q}"](input_ids[:, slot], attention_mask[:, slot], labels[:, slot])
            losses.append(out.loss)
            target = labels[:, slot]
            selected = target != IGNORE_INDEX
            with torch.no_grad():
                hits = (out.logits.argmax(-1) == target) & selected
                correct.append(hits.sum().float())
                masked.append(selected.sum().float())
        stacked = torch.stack(losses)
        return {
            "loss": stacked.sum(),
            "losses": stacked.detach(),
            "correct": torch.stack(correct),
            "masked": torch.stack(masked),
        }


def _bert_style(cfg: AudioFormerConfig) -> tuple[float, float, float] | None:
    return BERT_STYLE if cfg.mask_bert_style else None


class MLMLoop(TrainLoop):
    """Masked-LM pre-training of one RoFormer per codebook."""

    task = "mlm"
    columns = ("codes",)
    metric = "val_mlm_accuracy"
    metric_mode = "max"

    def build_model(self) -> nn.Module:
        model = CodebookMLM(self.cfg.audioformer)
        if self.cfg.train.init_from:
            start = checkpoints.resolve_checkpoint(
                self.cfg.train.init_from, "latest", self.cfg.storage
            )
            model.load_state_dict(checkpoints.load_model_state(start, self.cfg.storage))
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        groups = [{"params": list(m.parameters())} for m in model.models.values()]
        return torch.optim.Adam(groups, lr=self.cfg.train.lr)

    def collate_fn(self, train: bool, epoch: int = 0) -> CodesCollate:
        af = self.cfg.audioformer
        return CodesCollate(af.codebooks, af.max_positions)

    def _masked(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        af = self.cfg.audioformer
        return mask_tokens(batch["input_ids"], af.mask_prob, generator, _bert_style(af))

    def train_step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        ids, labels = self._masked(batch, generator)
        out = model(ids, batch["attention_mask"], labels)
        logs = {"loss": float(out["losses"].mean())}
        logs["mlm_accuracy"] = float(out["correct"].sum() / out["masked"].sum().clamp_min(1))
        return out["loss"], logs

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        n_q = len(self.cfg.audioformer.codebooks)
        device = next(model.parameters()).device
        totals = torch.zeros(3, n_q, dtype=torch.float64, device=device)
        generator = torch.Generator(device=device).manual_seed(EVAL_MASK_SEED)
        for batch in batches:
            ids, labels = self._masked(batch, generator)
            out = model(ids, batch["attention_mask"], labels)
            totals[0] += out["losses"].double() * out["masked"].double()
            totals[1] += out["correct"].double()
            totals[2] += out["masked"].double()
        loss_sum, correct, masked = sum_across_workers(totals).cpu()
        per_q_loss = loss_sum / masked.clamp_min(1)
        metrics = {
            "loss": float(per_q_loss.mean()),
            "mlm_accuracy": float(correct.sum() / masked.sum().clamp_min(1)),
        }
        for slot, q in enumerate(self.cfg.audioformer.codebooks):
            metrics[f"mlm_accuracy_c{q}"] = float(correct[slot] / masked[slot].clamp_min(1))
        return metrics


def pretrained_encoders(cfg: Config, codebooks: Sequence[int]) -> list[AudioFormerEncoder]:
    """Backbones of the given codebooks from the MLM checkpoint `train.init_from`.

    With no `init_from` the backbones are randomly initialised (logged as a warning):
    useful only to measure what pre-training adds.
    """
    if not cfg.train.init_from:
        logger.warning("train.init_from is empty: fine-tuning RANDOMLY initialised backbones")
        return [AudioFormerEncoder.from_config(cfg.audioformer) for _ in codebooks]
    uri = checkpoints.resolve_checkpoint(cfg.train.init_from, "latest", cfg.storage)
    saved_cfg = checkpoints.read_config(uri, cfg.storage)
    checkpoints.check_architecture(saved_cfg.audioformer, cfg.audioformer, uri)
    state = checkpoints.load_model_state(uri, cfg.storage)
    out = []
    for q in codebooks:
        mlm = AudioFormerMLM(cfg.audioformer)
        mlm.load_state_dict(checkpoints.sub_state(state, f"models.c{q}"))
        out.append(AudioFormerEncoder.from_mlm(mlm))
    return out


def finetuned_start(cfg: Config) -> str | None:
    """The checkpoint `train.init_from` names when it is an FT1 one (the previous phase
    of a phased fine-tuning), else None (an MLM checkpoint, or none)."""
    if not cfg.train.init_from:
        return None
    uri = checkpoints.resolve_checkpoint(cfg.train.init_from, "latest", cfg.storage)
    return uri if checkpoints.read_state(uri, cfg.storage)["task"] == "ft1" else None


def finetuning_labels(cfg: Config, scanned: LabelSpace) -> LabelSpace:
    """The label space of a fine-tuning run: the previous FT1 phase's (its classifier's
    outputs) when continuing one, else the one scanned from the training split."""
    previous = finetuned_start(cfg)
    if previous is None:
        return scanned
    saved = checkpoints.read_state(previous, cfg.storage)["loop"]["label_space"]
    return LabelSpace(labels=tuple(saved["labels"]), multi_label=bool(saved["multi_label"]))


class _ClassifierLoop(TrainLoop):
    """Shared by FT1 and FT2: labels, classification loss, classification metrics."""

    columns = ("codes", "labels")
    metric_mode = "max"

    def __init__(self, cfg: Config, label_space: LabelSpace) -> None:
        super().__init__(cfg)
        self.label_space = label_space
        self.loss_kind = cfg.audioformer.classification_loss
        if self.loss_kind not in CLASSIFICATION_LOSSES:
            raise ValueError(
                f"audioformer.classification_loss {self.loss_kind!r} not in {CLASSIFICATION_LOSSES}"
            )
        if self.loss_kind == "ce" and label_space.multi_label:
            raise ValueError("ce needs single-label data; use lsep or bce for multi-label sets")
        self.metric = "val_mAP" if label_space.multi_label else "val_accuracy"

    @property
    def codebooks(self) -> list[int]:
        return list(self.cfg.audioformer.codebooks)

    def collate_fn(self, train: bool, epoch: int = 0) -> CodesCollate:
        return CodesCollate(self.codebooks, self.cfg.audioformer.max_positions, self.label_space)

    def loss_targets(self, targets: Tensor) -> Tensor:
        """Targets in the form the configured loss takes (one-hot rows for LSEP/BCE)."""
        if self.label_space.multi_label or self.loss_kind == "ce":
            return targets
        known = targets != IGNORE_LABEL
        one_hot = F.one_hot(targets.clamp_min(0), self.label_space.n_classes).float()
        return one_hot * known[:, None]

    def mlc_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return classification_loss(logits.float(), self.loss_targets(targets), self.loss_kind)

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        scores, targets = [], []
        for batch in batches:
            scores.append(self.logits(model, batch).float())
            targets.append(batch["targets"])
        device = next(model.parameters()).device
        n_classes = self.label_space.n_classes
        local_scores = torch.cat(scores) if scores else torch.zeros(0, n_classes, device=device)
        target_shape = (0, n_classes) if self.label_space.multi_label else (0,)
        target_dtype = torch.float32 if self.label_space.multi_label else torch.long
        local_targets = (
            torch.cat(targets)
            if targets
            else torch.zeros(target_shape, dtype=target_dtype, device=device)
        )
        all_scores = gather_rows(local_scores).cpu()
        all_targets = gather_rows(local_targets).cpu()
        return classification_summary(all_scores, all_targets, self.label_space, self.mlc_loss)

    def state(self) -> dict[str, Any]:
        return {"label_space": dataclasses.asdict(self.label_space), "loss": self.loss_kind}


def classification_summary(
    scores: Tensor, targets: Tensor, label_space: LabelSpace, loss_fn: Any
) -> dict[str, float]:
    """Loss, accuracy (single-label) and mAP over the clips whose labels the model knows."""
    if not label_space.multi_label:
        known = targets != IGNORE_LABEL
        scores, targets = scores[known], targets[known]
    if scores.shape[0] == 0:
        return {"loss": float("nan"), "mAP": float("nan")}
    out = {"loss": float(loss_fn(scores, targets))}
    try:
        out.update(classification_metrics(scores, targets))
    except ValueError:
        out["mAP"] = float("nan")
    return out


class FT1Loop(_ClassifierLoop):
    """FT1: pre-trained codebook-1 backbone + mean pooling + linear classifier."""

    task = "ft1"

    @property
    def codebooks(self) -> list[int]:
        return list(self.cfg.audioformer.codebooks[:1])

    def build_model(self) -> nn.Module:
        previous = finetuned_start(self.cfg)
        if previous is not None:
            # A later FT1 phase (AS-2M: balanced after unbalanced): the whole classifier.
            checkpoints.check_architecture(
                checkpoints.read_config(previous, self.cfg.storage).audioformer,
                self.cfg.audioformer,
                previous,
            )
            encoder = AudioFormerEncoder.from_config(self.cfg.audioformer)
            model = AudioFormerClassifier(encoder, self.label_space.n_classes)
            model.load_state_dict(checkpoints.load_model_state(previous, self.cfg.storage))
            return model
        (encoder,) = pretrained_encoders(self.cfg, self.codebooks)
        return AudioFormerClassifier(encoder, self.label_space.n_classes)

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"][:, 0], batch["attention_mask"][:, 0])

    def train_step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        loss = self.mlc_loss(self.logits(model, batch), batch["targets"])
        return loss, {"loss": float(loss.detach())}


class FT2Loop(_ClassifierLoop):
    """FT2: FT1's classifier on codebook 1 plus MPC against frozen codebook-2..N views."""

    task = "ft2"
    columns = ("codes", "labels", "clip_id")

    def __init__(self, cfg: Config, label_space: LabelSpace) -> None:
        super().__init__(cfg, label_space)
        if len(cfg.audioformer.codebooks) < 2:
            raise ValueError("FT2 needs at least two codebooks in audioformer.codebooks")

    def build_model(self) -> nn.Module:
        anchor, *frozen = pretrained_encoders(self.cfg, self.codebooks)
        return AudioFormerFT2(AudioFormerClassifier(anchor, self.label_space.n_classes), frozen)

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"], batch["attention_mask"]).logits

    def train_step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        af = self.cfg.audioformer
        out = model(batch["input_ids"], batch["attention_mask"])
        mlc = self.mlc_loss(out.logits, batch["targets"])
        mpc = global_batch_mpc(out.views.float(), batch.get("clip_keys"), af.ft2_temperature)
        loss = af.ft2_alpha * mlc + (1.0 - af.ft2_alpha) * mpc
        logs = {
            "loss": float(loss.detach()),
            "mlc": float(mlc.detach()),
            "mpc": float(mpc.detach()),
        }
        return loss, logs


def global_batch_mpc(views: Tensor, clip_keys: Tensor | None, temperature: float) -> Tensor:
    """MPC (eq 8) over the global batch from this rank's views [b, V, D] and clip keys [b].

    Every rank scores the whole global batch, so its value is the single-process loss;
    the gather's backward sums the ranks' gradients into the local rows (world size x the
    single-process row gradient) and DDP's averaging brings the parameter gradient back to
    the full-batch step. The clip keys are gathered too, so a clip drawn on two workers is
    not its own negative.
    """
    gathered, _ = gather_with_grad(views)
    keys = gather_rows(clip_keys) if clip_keys is not None else None
    return mpc_loss(gathered, temperature, keys)


def finetune_loop(cfg: Config, label_space: LabelSpace) -> _ClassifierLoop:
    """The loop of `train.finetune_stage` ("ft1" or "ft2")."""
    stages = {"ft1": FT1Loop, "ft2": FT2Loop}
    if cfg.train.finetune_stage not in stages:
        raise ValueError(f"train.finetune_stage must be one of {sorted(stages)}")
    return stages[cfg.train.finetune_stage](cfg, label_space)
