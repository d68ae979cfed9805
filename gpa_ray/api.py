"""gpa_ray as a library: a trained GPA model used from Python, without Ray.

    from gpa_ray import GPA
    model = GPA.load("outputs/quickstart/runs/gpa")    # a run folder or checkpoint, or s3://
    audio = model.embed_audio(["dog.wav", (waveform, 16000)])
    probs = model.zero_shot(audio, ["dog", "rain"])     # [clips, labels], rows sum to 1

`GPA.load` rebuilds the model with `gpa_ray.models.factory.load_gpa_checkpoint` (a run
resolves to its best checkpoint, as for the index build and Serve), so the API embeds with
the very weights, config and preprocessing (`gpa_ray.audio.inputs.AudioInputs`) the jobs
use. Audio is decoded by `gpa_ray.audio.io.decode_audio` (wav, flac, ogg, mp3) from a
local path, an s3:// URI, raw bytes, or given as a mono array with its sample rate.

Determinism: an item's embedding does not depend on what it is batched with. CPU kernels
give a row different last bits at different batch sizes, and padding a short clip to a
longer one changes what the convolutions see at its end. So every model call here gets
exactly `batch_size` rows of one input shape: items are grouped by their tower input's
shape (frames, or tokens), and a group's last chunk is filled up with copies of its last
item. One clip alone and the same clip among a thousand others get the same bits, at the
cost of computing a lone item `batch_size` times; embeddings made with another
`batch_size` may differ in the last bits.

`search` (a text finds clips) and `search_audio` (a clip finds captions) query a local or
s3:// index version with the retrieval service's own code
(`gpa_ray.serve.retriever.SearchService`: two-stage search, the index's text bias, the
check that the index was built with these weights).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import torch

from gpa_ray import storage
from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.audio.io import decode_audio
from gpa_ray.checkpoints import Which
from gpa_ray.config import Config, ServeConfig, StorageConfig
from gpa_ray.embedding_table import embedding_table
from gpa_ray.index.search import ClipFilter
from gpa_ray.index.store import read_manifest, resolve_version
from gpa_ray.models.factory import LoadedGPA, load_gpa_checkpoint
from gpa_ray.models.gpa import Embeddings

AudioSource: TypeAlias = str | os.PathLike[str] | bytes | tuple[np.ndarray, int]
"""One clip: a local path or s3:// URI of an audio file, its bytes, or (mono waveform,
sample rate)."""
Audio: TypeAlias = AudioSource | Sequence[AudioSource] | Embeddings
Texts: TypeAlias = str | Sequence[str] | Embeddings
Inputs: TypeAlias = dict[str, torch.Tensor]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
"""File name endings taken for audio when a folder or prefix is listed (what libsndfile
decodes here)."""
DEFAULT_TEMPLATE = "the sound of a {label}"
DEFAULT_BATCH_SIZE = 8


class InputError(ValueError):
    """An input the API cannot use; the message names it (its position and source)."""


def default_device() -> str:
    """ "cuda" when a GPU is visible to torch, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_audio_source(item: object) -> bool:
    """True for one clip (`AudioSource`), False for a sequence of them."""
    if isinstance(item, str | os.PathLike | bytes | bytearray | memoryview):
        return True
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], np.ndarray | torch.Tensor)
        and isinstance(item[1], int | np.integer)
    )


def source_name(item: AudioSource, position: int) -> str:
    """How errors name a clip: its path or URI, else its position in the call."""
    if isinstance(item, str | os.PathLike):
        return os.fspath(item)
    kind = "bytes" if isinstance(item, bytes | bytearray | memoryview) else "waveform"
    return f"audio #{position} ({kind})"


def read_audio(
    item: AudioSource, position: int = 0, storage_cfg: StorageConfig | None = None
) -> tuple[np.ndarray, int]:
    """(mono float32 waveform, sample rate) of one clip; `InputError` names it otherwise."""
    name = source_name(item, position)
    if isinstance(item, tuple):
        wave, sr = item
        array = np.asarray(wave.detach().cpu() if isinstance(wave, torch.Tensor) else wave)
        if array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)):
            raise InputError(
                f"{name}: expected a non-empty finite mono waveform [n_samples], got shape "
                f"{array.shape}"
            )
        if int(sr) <= 0:
            raise InputError(f"{name}: sample rate must be positive, got {sr}")
        return array.astype(np.float32, copy=False), int(sr)
    if isinstance(item, str | os.PathLike):
        uri = os.path.expanduser(os.fspath(item))
        try:
            data = storage.read_bytes(uri, storage_cfg)
        except OSError as exc:
            raise InputError(f"cannot read audio {uri}: {exc}") from exc
    else:
        data = bytes(item)
    try:
        return decode_audio(data, name)
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def fixed_size_batches(
    items: Sequence[Inputs],
    batch_size: int,
    collate: Callable[[list[Inputs]], Inputs],
    run: Callable[[Inputs], Embeddings],
) -> Embeddings:
    """Embeddings of `items` in their order, each model call on exactly `batch_size` rows
    of one input shape (see the module docstring), so no item's bits depend on the others."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, item in enumerate(items):
        shape = tuple((key, tuple(value.shape)) for key, value in sorted(item.items()))
        groups.setdefault(shape, []).append(i)
    parts: list[Embeddings] = []
    order: list[int] = []
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            rows = [items[i] for i in chunk]
            rows += [rows[-1]] * (batch_size - len(rows))
            parts.append(run(collate(rows))[: len(chunk)].to("cpu", torch.float32))
            order.extend(chunk)
    emb = Embeddings.cat(parts)
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    return emb[position]


def _stack(rows: list[Inputs]) -> Inputs:
    """Equal-shape text inputs -> one batch."""
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


class GPA:
    """A trained GPA model for embedding, scoring, zero-shot classification and search.

    Build it with `GPA.load` (a checkpoint or run URI) or `GPA.from_index` (the model an
    index version was built with). Every method takes one item or a list and returns
    one row per item; embeddings are `gpa_ray.models.gpa.Embeddings` on the CPU
    (`global_` [N, E], `prototypes` [N, K+1, E] or None), L2-normalised.
    """

    def __init__(
        self,
        loaded: LoadedGPA,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
        storage_cfg: StorageConfig | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.loaded = loaded
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.batch_size = batch_size
        self.storage_cfg = storage_cfg
        self.inputs = AudioInputs.from_config(loaded.cfg)
        self._cpu_loaded: LoadedGPA | None = None
        self._services: dict[str, Any] = {}

    @classmethod
    def load(
        cls,
        uri: str | os.PathLike[str],
        *,
        which: Which = "best",
        device: str | torch.device | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        storage_cfg: StorageConfig | None = None,
    ) -> GPA:
        """The GPA of a checkpoint folder, or a training run's `which` ("best" or
        "latest") checkpoint; local or s3:// (`storage_cfg` reaches the bucket). `device`
        defaults to a GPU when there is one."""
        loaded = load_gpa_checkpoint(
            os.path.expanduser(os.fspath(uri)), storage_cfg, device="cpu", which=which
        )
        return cls(
            loaded,
            device=device or default_device(),
            batch_size=batch_size,
            storage_cfg=storage_cfg,
        )

    @classmethod
    def from_index(
        cls,
        index: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        storage_cfg: StorageConfig | None = None,
    ) -> GPA:
        """The GPA an index version (or an index root's LATEST) was built with."""
        layout = resolve_version(os.fspath(index), storage_cfg)
        checkpoint = read_manifest(layout, storage_cfg).checkpoint
        return cls.load(checkpoint, device=device, batch_size=batch_size, storage_cfg=storage_cfg)

    @property
    def checkpoint(self) -> str:
        """The concrete checkpoint URI the weights came from."""
        return self.loaded.checkpoint

    @property
    def digest(self) -> str:
        """SHA-256 of the checkpoint's `model.pt`: the weights' identity."""
        return self.loaded.digest

    @property
    def config(self) -> Config:
        """The resolved config the checkpoint was trained with."""
        return self.loaded.cfg

    @property
    def sample_rate(self) -> int:
        """The rate the audio tower reads (any input rate is resampled to it)."""
        return int(self.inputs.sample_rate)

    def audio_inputs(self, audio: AudioSource | Sequence[AudioSource]) -> list[Inputs]:
        """Tower inputs of each clip (decoded, resampled, cropped, featurised)."""
        items = [audio] if is_audio_source(audio) else list(audio)  # type: ignore[arg-type]
        out = []
        for i, item in enumerate(items):
            if not is_audio_source(item):
                raise InputError(
                    f"audio #{i}: expected a path, URI, bytes or (waveform, sample_rate), "
                    f"got {type(item).__name__}"
                )
            wave, sr = read_audio(item, i, self.storage_cfg)
            try:
                out.append(self.inputs.from_waveform(wave, sr))
            except ValueError as exc:
                raise InputError(f"{source_name(item, i)}: {exc}") from exc
        return out

    @torch.inference_mode()
    def embed_audio_inputs(self, items: Sequence[Inputs]) -> Embeddings:
        """Embeddings of ready tower inputs (`audio_inputs`), in fixed-size batches."""
        if not items:
            raise InputError("no audio given")

        def run(batch: Inputs) -> Embeddings:
            return self.model.embed_audio({k: v.to(self.device) for k, v in batch.items()})

        return fixed_size_batches(items, self.batch_size, self.inputs.collate, run)

    def embed_audio(self, audio: AudioSource | Sequence[AudioSource]) -> Embeddings:
        """Embeddings of one clip or a list of clips, one row each."""
        return self.embed_audio_inputs(self.audio_inputs(audio))

    @torch.inference_mode()
    def embed_text(self, texts: str | Sequence[str]) -> Embeddings:
        """Embeddings of one text or a list of texts, one row each."""
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            raise InputError("no text given")
        tokens = []
        for i, text in enumerate(items):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"text #{i}: expected a non-empty string, got {text!r}")
            ids = self.model.text_encoder.tokenize([text])
            tokens.append({key: value[0] for key, value in ids.items()})

        def run(batch: Inputs) -> Embeddings:
            return self.model.embed_text({k: v.to(self.device) for k, v in batch.items()})

        return fixed_size_batches(tokens, self.batch_size, _stack, run)

    def _audio(self, audio: Audio) -> Embeddings:
        return audio if isinstance(audio, Embeddings) else self.embed_audio(audio)

    def _texts(self, texts: Texts) -> Embeddings:
        return texts if isinstance(texts, Embeddings) else self.embed_text(texts)

    @torch.inference_mode()
    def score(self, audio: Audio, texts: Texts) -> np.ndarray:
        """The GPA score R = S_g + S'_p (eq 9) of every clip x text, [A, T] float32.

        Takes clips and texts, or their embeddings (`embed_audio`, `embed_text`)."""
        audio_emb, text_emb = self._audio(audio), self._texts(texts)
        scores = self.model.score_pool(audio_emb, text_emb, device=self.device)
        return scores.float().cpu().numpy()

    def label_scores(
        self,
        audio: Audio,
        labels: Sequence[str],
        template: str | Sequence[str] = DEFAULT_TEMPLATE,
    ) -> np.ndarray:
        """The GPA score R [A, len(labels)] of each clip against each label's prompts.

        Each label becomes a prompt through `template` ("{label}", underscores read as
        spaces); with several templates a label's score is the mean R over its prompts.
        These are `zero_shot`'s logits, and what a multi-label evaluation ranks clips by.
        """
        names = [str(label) for label in labels]
        if not names:
            raise InputError("zero_shot needs at least one label")
        templates = [template] if isinstance(template, str) else list(template)
        if not templates:
            raise InputError("zero_shot needs at least one template")
        for t in templates:
            if "{label}" not in t:
                raise InputError(f"template {t!r} has no {{label}} placeholder")
        prompts = [t.format(label=name.replace("_", " ")) for t in templates for name in names]
        return self.score(audio, prompts).reshape(-1, len(templates), len(names)).mean(1)

    def zero_shot(
        self,
        audio: Audio,
        labels: Sequence[str],
        template: str | Sequence[str] = DEFAULT_TEMPLATE,
        temperature: float | None = None,
    ) -> np.ndarray:
        """Probabilities [A, len(labels)] that each clip is of each label.

        The softmax over the labels of `label_scores` / `temperature` (default the
        model's `gpa.temperature`, the NT-Xent tau it trained with); the ranking does not
        depend on the temperature.
        """
        tau = self.config.gpa.temperature if temperature is None else float(temperature)
        if tau <= 0:
            raise InputError(f"temperature must be positive, got {tau}")
        scores = self.label_scores(audio, labels, template)
        logits = torch.from_numpy(scores).double() / tau
        return torch.softmax(logits, dim=1).float().numpy()

    def classify(
        self,
        audio: Audio,
        labels: Sequence[str],
        template: str | Sequence[str] = DEFAULT_TEMPLATE,
    ) -> list[str]:
        """The most likely label of each clip (`zero_shot`'s argmax)."""
        probs = self.zero_shot(audio, labels, template)
        return [labels[i] for i in probs.argmax(axis=1)]

    def _cpu(self) -> LoadedGPA:
        """The model on the CPU for stage 2 of a search (the index vectors are mapped
        into host memory): this model itself, or a CPU copy when it runs on a GPU."""
        if self.device.type == "cpu":
            return self.loaded
        if self._cpu_loaded is None:
            model = copy.deepcopy(self.model).cpu().eval()
            self._cpu_loaded = dataclasses.replace(self.loaded, model=model)
        return self._cpu_loaded

    def _service(self, index: str | os.PathLike[str]) -> Any:
        """The search service of an index URI, opened once."""
        from gpa_ray.serve.retriever import SearchService

        index = os.path.expanduser(os.fspath(index))
        if index not in self._services:
            cfg = Config(
                storage=self.storage_cfg or StorageConfig(),
                serve=ServeConfig(index_uri=index),
            )
            self._services[index] = SearchService(cfg, self._cpu())
        return self._services[index]

    def search(
        self,
        text: str,
        index: str | os.PathLike[str],
        k: int = 10,
        *,
        where: ClipFilter | None = None,
    ) -> list[dict[str, Any]]:
        """The top `k` clips of an index version (or an index root's LATEST) for a text.

        Each result is the retrieval service's record: `rank`, `score` (R), its parts
        `global_score` / `prototype_score`, and the clip's metadata (`clip_id`, `corpus`,
        `split`, `duration_s`, `captions`, `labels`). The index must have been built with
        these weights (`GPA.from_index` loads them)."""
        found = self._service(index).search_text(self.embed_text(text)[:1], k, where)
        return list(found["results"])

    def search_audio(
        self,
        audio: AudioSource | Embeddings,
        index: str | os.PathLike[str],
        k: int = 10,
        *,
        use_bias: bool = True,
        where: ClipFilter | None = None,
    ) -> list[dict[str, Any]]:
        """The top `k` captions of an index version for one clip, scored R + b_j with the
        index's Sinkhorn text bias b unless `use_bias` is False (records as `search`)."""
        emb = audio if isinstance(audio, Embeddings) else self.embed_audio(audio)
        found = self._service(index).search_audio(emb[:1], k, use_bias, where)
        return list(found["results"])


FILE_ID_COLUMN = "source_uri"
ERROR_COLUMN = "error"


def embed_files_table(model: GPA, uris: Sequence[str]) -> pa.Table:
    """`source_uri`, `error` and the embedding columns (`gpa_ray.embedding_table`) of audio
    files, one row each in order: what `gpa-ray embed` writes, locally or on Ray Data. A
    file that cannot be read or decoded gets its reason in `error` and zero vectors; the
    others get exactly `model.embed_audio(uri)`."""
    items: list[Inputs] = []
    ok: list[int] = []
    errors: list[str | None] = [None] * len(uris)
    for i, uri in enumerate(uris):
        try:
            items.append(model.audio_inputs(uri)[0])
            ok.append(i)
        except InputError as exc:
            errors[i] = str(exc)
    k = model.config.gpa.n_prototypes + 1 if model.model.uses_prototypes else 0
    e = model.config.gpa.embed_dim
    emb = Embeddings(torch.zeros(len(uris), e), torch.zeros(len(uris), k, e) if k else None)
    if ok:
        found = model.embed_audio_inputs(items)
        rows = torch.tensor(ok)
        emb.global_[rows] = found.global_
        if emb.prototypes is not None and found.prototypes is not None:
            emb.prototypes[rows] = found.prototypes
    table = embedding_table(list(uris), FILE_ID_COLUMN, emb)
    return table.add_column(1, ERROR_COLUMN, pa.array(errors, pa.string()))
