"""Transformers text encoder: per-token features, their padding mask and a pooled feature.

GPA needs both the token sequence (for the prototype generator) and one global feature per
caption (for the global score and the (K+1)-th prototype), so the encoder returns all three.
Tokenising is a separate step (`tokenize`) so data pipelines can tokenise on CPU workers and
training loops call `encode_tokens` on ready tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gpa_ray.config import StorageConfig, TextConfig
from gpa_ray.models.outputs import EncoderOutput
from gpa_ray.pretrained import resolve_model_ref

POOLINGS = ("mean", "cls", "pooler")


@dataclass(frozen=True)
class TextOutput(EncoderOutput):
    """Token features `frames` (also `tokens`) [B, Nt, D], `mask` [B, Nt] bool, `global_` [B, D]."""

    @property
    def tokens(self) -> Tensor:
        return self.frames


class TextEncoder(nn.Module):
    """A transformers encoder (BERT family and alike) with a pooling and a freezing policy.

    Freezing (`trainable_layers`): -1 trains everything, 0 freezes everything (the backbone
    then stays in eval mode and runs without autograd), n trains the last n transformer
    layers and whatever follows them. The model's pooler head trains only when
    `pooling == "pooler"`: otherwise it never touches the output, and a trainable parameter
    without gradients would break DistributedDataParallel.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: object,
        *,
        max_length: int = 48,
        pooling: str = "mean",
        trainable_layers: int = 0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"text pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "pooler" and getattr(backbone, "pooler", None) is None:
            raise ValueError("text pooling 'pooler' needs a backbone with a pooler head")
        if trainable_layers < -1:
            raise ValueError(f"trainable_layers must be -1, 0 or positive, got {trainable_layers}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pooling = pooling
        self.trainable_layers = trainable_layers
        self._apply_freezing()

    @classmethod
    def from_config(cls, cfg: TextConfig, storage_cfg: StorageConfig | None = None) -> TextEncoder:
        """Load tokenizer and weights named by `cfg.model` (never touching the hub unless
        `cfg.allow_download`; see `gpa_ray.pretrained`)."""
        from transformers import AutoModel, AutoTokenizer

        source = resolve_model_ref(cfg.model, storage_cfg, allow_download=cfg.allow_download)
        local_only = not cfg.allow_download
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        backbone = AutoModel.from_pretrained(source, local_files_only=local_only)
        return cls(
            backbone,
            tokenizer,
            max_length=cfg.max_length,
            pooling=cfg.pooling,
            trainable_layers=cfg.trainable_layers,
        )

    @property
    def dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    def transformer_layers(self) -> nn.ModuleList:
        """The backbone's list of transformer blocks (the ModuleList of num_hidden_layers)."""
        n_layers = int(self.backbone.config.num_hidden_layers)
        for module in self.backbone.modules():
            if isinstance(module, nn.ModuleList) and len(module) == n_layers:
                return module
        raise ValueError(
            f"cannot find the {n_layers} transformer layers of {type(self.backbone).__name__}"
        )

    def _apply_freezing(self) -> None:
        n = self.trainable_layers
        self.backbone.requires_grad_(n != 0)
        pooler = getattr(self.backbone, "pooler", None)
        if pooler is not None and self.pooling != "pooler":
            pooler.requires_grad_(False)
        if n > 0:
            layers = self.transformer_layers()
            embeddings = getattr(self.backbone, "embeddings", None)
            if embeddings is None:
                embeddings = self.backbone.get_input_embeddings()
            embeddings.requires_grad_(False)
            for layer in layers[: max(len(layers) - n, 0)]:
                layer.requires_grad_(False)
        if self.frozen:
            self.backbone.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        """Like `nn.Module.train`, but a fully frozen backbone stays in eval mode (no dropout)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def locked(self) -> TextEncoder:
        """A frozen copy of this encoder as it is now (itself when it is already frozen).

        CWCL's locked text tower: its features give the loss weights and stay fixed while
        this encoder trains. In eval mode (no dropout) and without gradients.
        """
        if self.frozen:
            return self
        frozen = copy.deepcopy(self)
        frozen.requires_grad_(False)
        return frozen.eval()

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Token ids and attention mask, padded to the longest text, cut at `max_length`."""
        batch = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def encode_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> TextOutput:
        """Run the backbone on ready token tensors (moved to the encoder's device)."""
        device = next(self.backbone.parameters()).device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        mask = attention_mask.bool()
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            global_ = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        elif self.pooling == "cls":
            global_ = hidden[:, 0]
        else:
            global_ = out.pooler_output
        return TextOutput(frames=hidden, mask=mask, global_=global_)

    def forward(self, texts: Sequence[str]) -> TextOutput:
        return self.encode_tokens(**self.tokenize(texts))
