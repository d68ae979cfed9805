"""EnCodec 24 kHz tokenizer: waveforms -> discrete codes [n_q, T], and AudioFormer token ids.

Meta's `encodec` package supplies the model. Weights come from one of:

- `pretrained`: the published 24 kHz checkpoint (torch hub cache or download);
- a local path or `s3://` URI of a state-dict checkpoint (e.g. written by `save_checkpoint`,
  or the published file copied into object storage);
- `random:<seed>`: the architecture with seeded random weights. A freshly built model has
  all-zero codebooks (the package expects k-means on the first training batch), which would
  map every frame to code 0; this mode therefore centres the encoder output and fills each
  codebook with seeded Gaussian vectors matched to the covariance of the encoder output
  (and then of each RVQ residual) on a seeded synthetic calibration signal, so codes are
  spread over the codebook. Such codes are reproducible but are NOT the published
  tokenizer's codes, and a warning says so.

At 3 kbps the model uses 4 codebooks of 1024 entries at 75 frames per second. The model
encodes roughly 7-12 audio-seconds per second on one CPU thread; this module never
changes torch's thread count (callers such as Ray workers set it).
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import warnings

import numpy as np
import torch
from encodec import EncodecModel

from gpa_ray import storage
from gpa_ray.config import CodecConfig, StorageConfig

logger = logging.getLogger(__name__)

CODEC_SAMPLE_RATE = 24000
FRAME_RATE = 75
HOP_LENGTH = CODEC_SAMPLE_RATE // FRAME_RATE
CODEBOOK_SIZE = 1024

BOA = 0
PAD = 1
EOA = 2
CODE_OFFSET = 3
MASK = 1027
VOCAB_SIZE = 1028

PRETRAINED_CHECKPOINT = "encodec_24khz-d7cc33bc.th"

# Calibration signal for `random:<seed>`: noise segments of three spectral colours at
# levels spanning quiet to loud, plus digital silence (common in zero-padded corpora).
_CALIBRATION_SEGMENTS = 16
_CALIBRATION_SEGMENT_SAMPLES = CODEC_SAMPLE_RATE // 4
_CALIBRATION_DB_RANGE = (-70.0, -10.0)


class CodecWeightsError(RuntimeError):
    """The requested EnCodec weights cannot be obtained or do not fit the model."""


def n_frames(n_samples_24k: int) -> int:
    """Code frames for a clip of `n_samples_24k` samples at 24 kHz: ceil(n * 75 / 24000)."""
    return math.ceil(n_samples_24k * FRAME_RATE / CODEC_SAMPLE_RATE)


def to_token_ids(codes_row: np.ndarray) -> np.ndarray:
    """One codebook row of codes -> AudioFormer ids [BOA, c + 3, ..., EOA] (int64)."""
    codes = np.asarray(codes_row)
    if codes.ndim != 1:
        raise ValueError(f"expected one codebook row (1-D), got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= CODEBOOK_SIZE):
        raise ValueError(
            f"codes must lie in [0, {CODEBOOK_SIZE - 1}], got [{codes.min()}, {codes.max()}]"
        )
    out = np.empty(codes.size + 2, dtype=np.int64)
    out[0] = BOA
    out[1:-1] = codes.astype(np.int64) + CODE_OFFSET
    out[-1] = EOA
    return out


def from_token_ids(ids: np.ndarray) -> np.ndarray:
    """AudioFormer ids -> codes (int16): drop BOA/PAD/EOA, subtract the offset.

    MASK or an id outside the vocabulary has no code, so it is an error.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"expected a 1-D id sequence, got shape {ids.shape}")
    bad = (ids < 0) | (ids >= VOCAB_SIZE)
    if bad.any():
        raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary [0, {VOCAB_SIZE})")
    if (ids == MASK).any():
        raise ValueError("token ids contain MASK, which has no code")
    codes = ids[ids >= CODE_OFFSET] - CODE_OFFSET
    return codes.astype(np.int16)


def _build_model(seed: int = 0) -> EncodecModel:
    """The 24 kHz architecture with seeded init, leaving the caller's global RNG untouched."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # The package still uses torch.nn.utils.weight_norm, which warns on every conv.
        warnings.simplefilter("ignore", FutureWarning)
        torch.manual_seed(seed)
        return EncodecModel.encodec_model_24khz(pretrained=False).eval()


def _calibration_audio(generator: torch.Generator) -> torch.Tensor:
    """Seeded white, brown and low-passed noise at random levels, with one silent segment."""
    f64 = torch.float64
    segments = [torch.zeros(_CALIBRATION_SEGMENT_SAMPLES, dtype=f64)]
    low_db, high_db = _CALIBRATION_DB_RANGE
    for i in range(_CALIBRATION_SEGMENTS - 1):
        noise = torch.randn(_CALIBRATION_SEGMENT_SAMPLES, generator=generator, dtype=f64)
        if i % 3 == 1:
            noise = torch.cumsum(noise, 0)
        elif i % 3 == 2:
            kernel = torch.full((1, 1, 24), 1.0 / 24.0, dtype=f64)
            noise = torch.nn.functional.conv1d(noise[None, None], kernel, padding=12)[0, 0]
            noise = noise[:_CALIBRATION_SEGMENT_SAMPLES]
        noise = noise - noise.mean()
        level_db = low_db + (high_db - low_db) * float(torch.rand(1, generator=generator))
        segments.append(noise / noise.std() * 10.0 ** (level_db / 20.0))
    return torch.cat(segments)


def _snap(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Round to a power-of-two grid ~1/4096 of `scale`, then to float32.

    Float64 results computed with different thread counts differ in the last bits; were
    they rounded straight to float32, a few of millions of values would land on different
    sides of a rounding boundary. On this much coarser grid that practically never
    happens, so `random:<seed>` weights are bit-identical whatever the thread count.
    """
    step = 2.0 ** (round(math.log2(scale)) - 12)
    return (torch.round(x / step) * step).float()


def _gaussian_like(samples: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` seeded draws (float64) from a Gaussian with the mean and covariance of `samples`.

    The Cholesky factor is unique (eigenvectors are only defined up to sign), so the draws
    do not depend on how the linear algebra library happens to orient them.
    """
    cov = torch.cov(samples.T)
    jitter = 1e-9 * float(torch.diagonal(cov).mean()) + 1e-30
    chol = torch.linalg.cholesky(cov + jitter * torch.eye(cov.shape[0], dtype=cov.dtype))
    z = torch.randn(n, samples.shape[1], generator=generator, dtype=torch.float64)
    return samples.mean(0) + z @ chol.T


def _calibrate_random(model: EncodecModel, generator: torch.Generator) -> None:
    """Make a randomly initialised model give spread-out, numerically stable codes.

    A random encoder's output is dominated by one constant vector (its frame-to-frame
    variation is ~5% of its norm), so nearest-codeword search would lose most float32
    precision to cancellation and flip codes under tiny numeric differences (e.g. batch vs
    single). The final encoder conv's bias is shifted so the output is centred on the
    calibration signal. Then codebook q is drawn to match the mean and covariance of the
    residual left by codebooks 0..q-1, so each stage quantizes what the previous ones
    missed. `inited` is set so the package never runs its own k-means over these values.
    The calibration runs in float64 and its results are snapped to a coarse grid, so the
    float32 weights do not depend on the thread count (float32 reductions change with it).
    """
    audio = _calibration_audio(generator)
    encoder = model.encoder.double()
    with torch.inference_mode():
        residual = encoder(audio[None, None])[0].T.clone()
    model.encoder.float()
    mean = residual.mean(0)
    with torch.no_grad():
        bias = model.encoder.model[-1].conv.conv.bias
        bias.copy_(_snap(bias.double() - mean, float(mean.abs().max())))
    residual = residual - mean
    for layer in model.quantizer.vq.layers:
        book = layer._codebook
        draws = _gaussian_like(residual, book.embed.shape[0], generator)
        embed = _snap(draws, float(residual.std()))
        with torch.no_grad():
            book.embed.copy_(embed)
            book.embed_avg.copy_(embed)
            book.inited.fill_(1.0)
        nearest = torch.cdist(residual, embed.double()).argmin(dim=1)
        residual = residual - embed.double()[nearest]


class EncodecTokenizer:
    """Mono 24 kHz waveforms -> EnCodec codes [n_q, T] (int16), T = n_frames(len)."""

    def __init__(
        self,
        weights: str = "random:0",
        bandwidth: float = 3.0,
        device: str = "cpu",
        storage_cfg: StorageConfig | None = None,
        chunk_s: float = 0.0,
        chunk_overlap_s: float = 2.0,
    ) -> None:
        if chunk_s < 0 or chunk_overlap_s < 0:
            raise ValueError(
                f"codec.chunk_s ({chunk_s}) and codec.chunk_overlap_s ({chunk_overlap_s}) "
                "must be >= 0"
            )
        self.chunk_frames = round(chunk_s * FRAME_RATE)
        self.overlap_frames = round(chunk_overlap_s * FRAME_RATE)
        self.weights = weights
        self.device = torch.device(device)
        self.storage_cfg = storage_cfg
        self.model = self._load(weights).to(self.device).eval()
        self.model.set_target_bandwidth(float(bandwidth))
        self.bandwidth = float(bandwidth)
        self.n_q = self.model.quantizer.get_num_quantizers_for_bandwidth(
            self.model.frame_rate, self.bandwidth
        )

    @classmethod
    def from_config(
        cls, cfg: CodecConfig, storage_cfg: StorageConfig | None = None
    ) -> EncodecTokenizer:
        return cls(
            weights=cfg.weights,
            bandwidth=cfg.bandwidth,
            device=cfg.device,
            storage_cfg=storage_cfg,
            chunk_s=cfg.chunk_s,
            chunk_overlap_s=cfg.chunk_overlap_s,
        )

    def _load(self, weights: str) -> EncodecModel:
        if weights.startswith("random:"):
            return self._random(weights)
        if weights == "pretrained":
            return self._pretrained()
        return self._from_checkpoint(weights)

    def _random(self, weights: str) -> EncodecModel:
        try:
            seed = int(weights.split(":", 1)[1])
        except ValueError as exc:
            raise CodecWeightsError(
                f"bad codec weights {weights!r}: expected random:<integer seed>"
            ) from exc
        model = _build_model(seed)
        _calibrate_random(model, torch.Generator().manual_seed(seed))
        message = (
            f"EnCodec weights {weights!r}: seeded RANDOM model. Its codes are reproducible "
            "but are NOT the published EnCodec tokenizer's codes; use 'pretrained' or a "
            "checkpoint path/URI for real codes."
        )
        warnings.warn(message, UserWarning, stacklevel=4)
        logger.warning(message)
        return model

    def _pretrained(self) -> EncodecModel:
        """The published checkpoint from the torch hub cache, downloading it if absent."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return EncodecModel.encodec_model_24khz(pretrained=True)
        except (OSError, RuntimeError) as exc:
            raise CodecWeightsError(
                "the published EnCodec 24 kHz checkpoint is not obtainable "
                f"({type(exc).__name__}: {exc}); set codec.weights to a checkpoint path or "
                f"s3:// URI (e.g. a copy of {PRETRAINED_CHECKPOINT}) or to random:<seed>"
            ) from exc

    def _from_checkpoint(self, uri: str) -> EncodecModel:
        try:
            data = storage.read_bytes(uri, self.storage_cfg)
        except storage.StorageError as exc:
            raise CodecWeightsError(
                f"codec weights {uri!r} are neither 'pretrained', 'random:<seed>' nor a "
                f"readable checkpoint: {exc}"
            ) from exc
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            model = _build_model()
            model.load_state_dict(state)
        except (
            pickle.UnpicklingError,
            RuntimeError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            EOFError,
        ) as exc:
            raise CodecWeightsError(
                f"{uri} is not an EnCodec 24 kHz state dict: {type(exc).__name__}: {exc}"
            ) from exc
        return model

    def save_checkpoint(self, uri: str) -> None:
        """Write the model's state dict to a local path or s3:// URI (atomically)."""
        buf = io.BytesIO()
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        torch.save(state, buf)
        storage.write_bytes(uri, buf.getvalue(), self.storage_cfg)

    def encode(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Encode mono 24 kHz float32 clips in one batch; codes int16 [n_q, n_frames(len)].

        Each clip's last partial frame is completed with zeros (silence), and the batch is
        right-padded with zeros to the longest clip. The encoder is causal (convolutions and
        LSTM), so what follows a clip does not change its codes: a clip gets the same codes
        alone or in any batch. Padding costs compute, so batch clips of similar length.
        Clips longer than the chunk (`codec.chunk_s`) are encoded alone by `encode_long`.
        """
        if not waves:
            return []
        arrays = [np.asarray(w, dtype=np.float32) for w in waves]
        for i, w in enumerate(arrays):
            if w.ndim != 1 or w.shape[0] == 0:
                raise ValueError(f"clip {i}: expected a non-empty 1-D waveform, got {w.shape}")
        long = [self._is_long(w) for w in arrays]
        if any(long):
            short = [w for w, is_long in zip(arrays, long, strict=True) if not is_long]
            done = iter(self._encode_batch(short) if short else [])
            return [
                self.encode_long(w) if is_long else next(done)
                for w, is_long in zip(arrays, long, strict=True)
            ]
        return self._encode_batch(arrays)

    def _is_long(self, wave: np.ndarray) -> bool:
        return bool(self.chunk_frames) and n_frames(wave.shape[0]) > self.chunk_frames

    def encode_long(self, wave: np.ndarray) -> np.ndarray:
        """Encode one clip of any length chunk by chunk; codes int16 [n_q, n_frames(len)].

        Chunk c keeps the codes of frames [c F, (c + 1) F) (F = `chunk_s` x 75) and is
        encoded from `chunk_overlap_s` before its first frame: the encoder is causal, so
        away from a chunk's start its codes are the whole-file codes once the convolutions'
        receptive field and the LSTM's memory of its zero start lie inside the overlap
        (`tests/audio/test_codec.py` measures it). Every chunk starts on a frame boundary,
        so frames line up with a whole-file encode.
        """
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1 or wave.shape[0] == 0:
            raise ValueError(f"expected a non-empty 1-D waveform, got {wave.shape}")
        total = n_frames(wave.shape[0])
        step = self.chunk_frames or total
        parts = []
        for first in range(0, total, step):
            context = max(0, first - self.overlap_frames)
            stop = min(first + step, total)
            piece = wave[context * HOP_LENGTH : stop * HOP_LENGTH]
            (codes,) = self._encode_batch([piece])
            parts.append(codes[:, first - context : stop - context])
        return np.concatenate(parts, axis=1)

    def _encode_batch(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One model call over `arrays` (non-empty 1-D float32), right-padded to the longest."""
        longest = max(n_frames(w.shape[0]) for w in arrays) * HOP_LENGTH
        batch = np.zeros((len(arrays), 1, longest), dtype=np.float32)
        for i, w in enumerate(arrays):
            batch[i, 0, : w.shape[0]] = w
        with torch.inference_mode():
            [(codes, _scale)] = self.model.encode(torch.from_numpy(batch).to(self.device))
        codes = codes.cpu().numpy()
        return [codes[i, :, : n_frames(w.shape[0])].astype(np.int16) for i, w in enumerate(arrays)]

    def encode_one(self, wave: np.ndarray) -> np.ndarray:
        """Encode one clip; codes int16 [n_q, n_frames(len)]."""
        return self.encode([wave])[0]
