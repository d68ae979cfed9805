"""A deterministic procedural corpus of captioned sounds that a retrieval model can learn.

Why: the quickstart, the tests and any offline demo need a captioned corpus that needs no
download and no licence, yet is not noise: the captions must describe what is audible, so
that a text-audio model trained on it actually improves. Each clip is one of eight sound
types (a pure tone, a warbling tone, a rising or falling chirp, a harmonic buzz, band
noise, beeps, clicks) with attributes that change the waveform and appear in the text:

- pitch: low / mid / high (fundamental, chirp centre, noise band or click resonance);
- rate: slow / fast repetitions (beeps, clicks, warble only);
- loudness: quiet / loud (clip RMS level, about 20 dB apart);
- duration: short / long (below / above the midpoint of [min_seconds, max_seconds]);
- envelope: fade_in / fade_out / steady.

Layout written under `root` (a local folder or an `s3://` URI):

    root/audio/synth_00000.wav ...   mono PCM_16 WAV at `cfg.sample_rate`
    root/captions.csv                file_name,caption,split,labels

File-name convention: `file_name` is relative to the corpus's `audio/` folder and carries no
`audio/` prefix (`synth_00007.wav`), like the Clotho and AudioCaps caption files; a reader
resolves it as `<root>/audio/<file_name>`. `captions.csv` has one row per caption (several
rows per file, in clip order), `split` is `train`, `val` or `test`, and `labels` is a
`;`-separated list: `sound:<type>` followed by `<attribute>:<value>` for every attribute
the clip has (e.g. `sound:beeps;pitch:high;rate:fast;loudness:loud;duration:short;
envelope:steady`).

Determinism: every clip draws from generators seeded by (cfg.seed, clip index, stream), so
a clip does not depend on the clip order or on how many clips are generated, and the same
config writes byte-identical files (no timestamps; samples are quantised here, the CSV
uses `\\n` line ends and minimal quoting). Splits are exact counts: clips are ranked by a
per-clip key and the lowest ranks go to test, then val. Generating again into the same root
overwrites same-named files; audio left there by an earlier, larger corpus is not deleted,
but `captions.csv` lists exactly the clips of the latest run.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from gpa_ray import storage
from gpa_ray.config import StorageConfig, SyntheticConfig
from gpa_ray.config_loading import ConfigError

SOUNDS = ("tone", "warble", "chirp_up", "chirp_down", "buzz", "noise", "beeps", "clicks")
REPEATING = frozenset({"warble", "beeps", "clicks"})
PITCHES = ("low", "mid", "high")
RATES = ("slow", "fast")
LOUDNESSES = ("quiet", "loud")
DURATIONS = ("short", "long")
ENVELOPES = ("fade_in", "fade_out", "steady")

# Frequency bands (Hz) per pitch class: far enough apart that the classes do not overlap
# even for the two-octave chirps' centres or the buzz's harmonic spread.
PITCH_BANDS = {"low": (100.0, 250.0), "mid": (400.0, 900.0), "high": (1800.0, 4000.0)}
# Repetition rates (Hz) per sound: beeps gate the tone, clicks are an impulse train,
# warble is the vibrato rate.
RATE_BANDS = {
    "beeps": {"slow": (1.5, 3.0), "fast": (6.0, 10.0)},
    "clicks": {"slow": (2.0, 4.0), "fast": (10.0, 20.0)},
    "warble": {"slow": (2.0, 4.0), "fast": (8.0, 14.0)},
}
# Target clip RMS in dBFS; peaks are then limited below full scale.
LEVEL_BANDS_DB = {"quiet": (-44.0, -36.0), "loud": (-20.0, -14.0)}
FADE_RANGE_DB = 30.0
EDGE_RAMP_S = 0.01
PEAK_LIMIT = 0.98

# Independent random streams: per clip (spec, split key) and per spec seed (audio, words).
_STREAM_SPEC, _STREAM_SPLIT = 0, 1
_STREAM_AUDIO, _STREAM_CAPTIONS = 0, 1
CSV_COLUMNS = ("file_name", "caption", "split", "labels")


@dataclass(frozen=True)
class ClipSpec:
    """What one clip is: sound type, attribute classes, length, caption count and seed.

    Continuous parameters (the exact frequency, rate and level, each inside its class's
    band) and the caption wording are drawn from `seed` when rendering, so changing one
    attribute with `dataclasses.replace` gives the same clip with only that attribute
    changed.
    """

    index: int
    sound: str
    pitch: str
    rate: str | None
    loudness: str
    duration: str
    envelope: str
    n_samples: int
    sample_rate: int
    n_captions: int
    seed: int

    @property
    def seconds(self) -> float:
        return self.n_samples / self.sample_rate

    @property
    def file_name(self) -> str:
        return clip_file_name(self.index)

    @property
    def labels(self) -> list[str]:
        """`sound:<type>` then `<attribute>:<value>` for each attribute the clip has."""
        out = [f"sound:{self.sound}", f"pitch:{self.pitch}"]
        if self.rate is not None:
            out.append(f"rate:{self.rate}")
        out += [
            f"loudness:{self.loudness}",
            f"duration:{self.duration}",
            f"envelope:{self.envelope}",
        ]
        return out


def clip_file_name(index: int) -> str:
    """`synth_00007.wav`: zero-padded so that names sort in clip order up to 100k clips."""
    return f"synth_{index:05d}.wav"


def _clip_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def validate(cfg: SyntheticConfig) -> None:
    """Fail early, naming the field, on a config that cannot produce a sensible corpus."""
    if cfg.n_clips < 1:
        raise ConfigError(f"synthetic.n_clips must be >= 1, got {cfg.n_clips}")
    if cfg.seed < 0:
        raise ConfigError(f"synthetic.seed must be >= 0, got {cfg.seed}")
    if cfg.sample_rate < 8000:
        raise ConfigError(f"synthetic.sample_rate must be >= 8000, got {cfg.sample_rate}")
    if not 0 < cfg.min_seconds <= cfg.max_seconds:
        raise ConfigError(
            "synthetic.min_seconds/max_seconds must satisfy 0 < min <= max, got "
            f"{cfg.min_seconds}/{cfg.max_seconds}"
        )
    if cfg.min_seconds < 4 * EDGE_RAMP_S:
        raise ConfigError(f"synthetic.min_seconds must be >= {4 * EDGE_RAMP_S}")
    fractions = (cfg.val_fraction, cfg.test_fraction)
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ConfigError(
            "synthetic.val_fraction and test_fraction must be >= 0 and sum to < 1, got "
            f"{cfg.val_fraction}/{cfg.test_fraction}"
        )
    if not 1 <= cfg.min_captions <= cfg.max_captions:
        raise ConfigError(
            "synthetic.min_captions/max_captions must satisfy 1 <= min <= max, got "
            f"{cfg.min_captions}/{cfg.max_captions}"
        )


def describe_clip(cfg: SyntheticConfig, index: int) -> ClipSpec:
    """Draw clip `index`'s spec from its own generator (independent of every other clip)."""
    rng = _clip_rng(cfg.seed, index, _STREAM_SPEC)
    sound = SOUNDS[rng.integers(len(SOUNDS))]
    pitch = PITCHES[rng.integers(len(PITCHES))]
    rate = RATES[rng.integers(len(RATES))]
    loudness = LOUDNESSES[rng.integers(len(LOUDNESSES))]
    duration = DURATIONS[rng.integers(len(DURATIONS))]
    envelope = ENVELOPES[rng.integers(len(ENVELOPES))]
    mid = 0.5 * (cfg.min_seconds + cfg.max_seconds)
    low, high = (cfg.min_seconds, mid) if duration == "short" else (mid, cfg.max_seconds)
    seconds = rng.uniform(low, high)
    first = math.ceil(cfg.min_seconds * cfg.sample_rate)
    last = max(first, math.floor(cfg.max_seconds * cfg.sample_rate))
    n_samples = min(max(round(seconds * cfg.sample_rate), first), last)
    return ClipSpec(
        index=index,
        sound=sound,
        pitch=pitch,
        rate=rate if sound in REPEATING else None,
        loudness=loudness,
        duration=duration,
        envelope=envelope,
        n_samples=n_samples,
        sample_rate=cfg.sample_rate,
        n_captions=int(rng.integers(cfg.min_captions, cfg.max_captions + 1)),
        seed=int(rng.integers(0, 2**63)),
    )


def _loguniform(rng: np.random.Generator, band: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(np.log(band[0]), np.log(band[1]))))


def _phase(freq: np.ndarray, sample_rate: int) -> np.ndarray:
    """Instantaneous phase of a tone whose frequency varies per sample."""
    return 2 * np.pi * np.cumsum(freq) / sample_rate


def _source(spec: ClipSpec, rng: np.random.Generator, f0: float, rate_hz: float) -> np.ndarray:
    """The raw waveform of the sound type, before envelope and level."""
    sr, n = spec.sample_rate, spec.n_samples
    nyquist_safe = 0.45 * sr
    t = np.arange(n) / sr
    phase0 = rng.uniform(0, 2 * np.pi)
    if spec.sound == "tone":
        return np.sin(2 * np.pi * f0 * t + phase0)
    if spec.sound == "warble":
        depth = rng.uniform(0.03, 0.06)
        freq = f0 * (1 + depth * np.sin(2 * np.pi * rate_hz * t + phase0))
        return np.sin(_phase(np.minimum(freq, nyquist_safe), sr))
    if spec.sound in ("chirp_up", "chirp_down"):
        span = rng.uniform(1.0, 2.0)
        x = t / t[-1] if n > 1 else t
        if spec.sound == "chirp_down":
            x = 1 - x
        freq = np.minimum(f0 * 2.0 ** (span * (x - 0.5)), nyquist_safe)
        return np.sin(_phase(freq, sr) + phase0)
    if spec.sound == "buzz":
        n_harmonics = max(1, min(24, int(nyquist_safe // f0)))
        base = 2 * np.pi * f0 * t + phase0
        return sum(np.sin(k * base) / k for k in range(1, n_harmonics + 1))
    if spec.sound == "noise":
        spectrum = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / sr)
        octaves = np.log2(np.maximum(freqs, 1.0) / f0)
        spectrum *= np.exp(-0.5 * (octaves / 0.5) ** 2)
        return np.fft.irfft(spectrum, n)
    if spec.sound == "beeps":
        duty = rng.uniform(0.35, 0.6)
        ramp = 0.003
        period = 1 / rate_hz
        pos = ((t * rate_hz + rng.uniform()) % 1.0) * period
        gate = np.clip(np.minimum(pos, duty * period - pos) / ramp, 0.0, 1.0)
        return gate * np.sin(2 * np.pi * f0 * t + phase0)
    if spec.sound == "clicks":
        tau = rng.uniform(0.004, 0.008)
        kt = np.arange(int(6 * tau * sr)) / sr
        kernel = np.exp(-kt / tau) * np.sin(2 * np.pi * f0 * kt)
        out = np.zeros(n)
        start = rng.uniform(0, 1 / rate_hz)
        onsets = np.arange(start, spec.seconds, 1 / rate_hz)
        gains = rng.uniform(0.8, 1.0, size=len(onsets))
        for onset, gain in zip(onsets, gains, strict=True):
            i = int(onset * sr)
            m = min(len(kernel), n - i)
            out[i : i + m] += gain * kernel[:m]
        return out
    raise ValueError(f"unknown sound type {spec.sound!r}; expected one of {SOUNDS}")


def _envelope(spec: ClipSpec) -> np.ndarray:
    """Gain over time: a linear-in-dB fade or flat, always with short edge ramps (no clicks)."""
    n, sr = spec.n_samples, spec.sample_rate
    x = np.linspace(0.0, 1.0, n)
    if spec.envelope == "fade_in":
        gain = 10 ** (-FADE_RANGE_DB * (1 - x) / 20)
    elif spec.envelope == "fade_out":
        gain = 10 ** (-FADE_RANGE_DB * x / 20)
    elif spec.envelope == "steady":
        gain = np.ones(n)
    else:
        raise ValueError(f"unknown envelope {spec.envelope!r}; expected one of {ENVELOPES}")
    m = min(int(EDGE_RAMP_S * sr), n // 2)
    edge = 0.5 - 0.5 * np.cos(np.pi * np.arange(m) / m)
    gain[:m] *= edge
    gain[n - m :] *= edge[::-1]
    return gain


def render_clip(spec: ClipSpec) -> np.ndarray:
    """The clip's mono waveform (float32 in [-1, 1], `spec.n_samples` long)."""
    rng = np.random.default_rng([spec.seed, _STREAM_AUDIO])
    f0 = min(_loguniform(rng, PITCH_BANDS[spec.pitch]), 0.4 * spec.sample_rate)
    rate_hz = rng.uniform(*RATE_BANDS[spec.sound][spec.rate]) if spec.rate else 0.0
    level_db = rng.uniform(*LEVEL_BANDS_DB[spec.loudness])
    signal = _source(spec, rng, f0, rate_hz) * _envelope(spec)
    rms = float(np.sqrt(np.mean(signal**2)))
    signal *= 10 ** (level_db / 20) / max(rms, 1e-12)
    peak = float(np.max(np.abs(signal)))
    if peak > PEAK_LIMIT:
        signal *= PEAK_LIMIT / peak
    return signal.astype(np.float32)


def encode_wav(waveform: np.ndarray, sample_rate: int) -> bytes:
    """PCM_16 mono WAV bytes; quantised here (round to nearest) so bytes never vary."""
    pcm = np.clip(np.round(waveform.astype(np.float64) * 32767), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# Caption vocabulary. Nouns carry their grammatical kind: "a" countable nouns take an
# article, "pl" plurals and "mass" nouns do not. No noun implies a pitch, rate, loudness,
# duration or envelope, so only the attribute words carry those.
NOUNS: dict[str, list[tuple[str, str]]] = {
    "tone": [
        ("tone", "a"),
        ("pure tone", "a"),
        ("sine tone", "a"),
        ("sine wave", "a"),
        ("electronic tone", "a"),
        ("whistle-like tone", "a"),
    ],
    "warble": [
        ("warbling tone", "a"),
        ("wavering tone", "a"),
        ("vibrato tone", "a"),
        ("warble", "a"),
        ("wobbling whistle", "a"),
    ],
    "chirp_up": [
        ("rising chirp", "a"),
        ("upward sweep", "a"),
        ("rising tone", "a"),
        ("ascending whistle", "a"),
        ("upward glide", "a"),
    ],
    "chirp_down": [
        ("falling chirp", "a"),
        ("downward sweep", "a"),
        ("falling tone", "a"),
        ("descending whistle", "a"),
        ("downward glide", "a"),
    ],
    "buzz": [
        ("buzz", "a"),
        ("buzzing tone", "a"),
        ("electric buzz", "a"),
        ("raspy drone", "a"),
        ("buzzing", "mass"),
    ],
    "noise": [
        ("noise", "mass"),
        ("rush of noise", "a"),
        ("static", "mass"),
        ("band of noise", "a"),
        ("whooshing noise", "mass"),
    ],
    "beeps": [
        ("beeps", "pl"),
        ("beeping", "mass"),
        ("series of beeps", "a"),
        ("pulsing tone", "a"),
        ("bleeps", "pl"),
    ],
    "clicks": [
        ("clicks", "pl"),
        ("clicking", "mass"),
        ("ticking", "mass"),
        ("series of clicks", "a"),
        ("train of clicks", "a"),
        ("tapping", "mass"),
    ],
}
# Per attribute value: adjectives (before the noun) and phrases (after it).
ADJECTIVES: dict[str, list[str]] = {
    "pitch:low": ["low", "low pitched", "deep", "low frequency"],
    "pitch:mid": ["mid pitched", "medium pitched", "mid range", "middle pitched"],
    "pitch:high": ["high", "high pitched", "shrill", "high frequency"],
    "loudness:quiet": ["quiet", "soft", "faint", "gentle"],
    "loudness:loud": ["loud", "strong", "powerful", "intense"],
    "duration:short": ["short", "brief", "momentary"],
    "duration:long": ["long", "sustained", "lengthy", "prolonged"],
    "envelope:fade_in": ["swelling", "growing", "fading-in"],
    "envelope:fade_out": ["fading", "decaying", "dying"],
    "envelope:steady": ["steady", "constant", "stable"],
    "rate:slow": ["slow", "slow-paced"],
    "rate:fast": ["rapid", "fast", "fast-paced"],
}
PHRASES: dict[str, list[str]] = {
    "pitch:low": ["at a low pitch", "in a low register", "with a deep pitch"],
    "pitch:mid": ["at a medium pitch", "in a middle register", "at a moderate pitch"],
    "pitch:high": ["at a high pitch", "in a high register", "with a shrill pitch"],
    "loudness:quiet": ["in the background", "barely audible", "very softly"],
    "loudness:loud": ["at full volume", "blaring loudly", "turned up loud"],
    "duration:short": ["for a moment", "briefly", "for a short time"],
    "duration:long": ["for a while", "for several seconds", "for a long time"],
    "envelope:fade_in": ["fading in", "growing louder", "getting gradually louder"],
    "envelope:fade_out": ["fading out", "dying away", "getting gradually quieter"],
    "envelope:steady": [
        "at a constant volume",
        "holding a steady level",
        "without changing volume",
    ],
}
# Rate phrases depend on the sound: beeps and clicks repeat, a warble wavers.
RATE_PHRASES: dict[str, dict[str, list[str]]] = {
    "beeps": {
        "slow": ["repeating slowly", "at a slow pace", "spaced far apart"],
        "fast": ["repeating quickly", "in quick succession", "at a rapid pace"],
    },
    "clicks": {
        "slow": ["repeating slowly", "at a slow pace", "spaced far apart"],
        "fast": ["repeating quickly", "in quick succession", "at a rapid pace"],
    },
    "warble": {
        "slow": ["wavering slowly", "with a slow wobble", "with a slow vibrato"],
        "fast": ["wavering quickly", "with a fast wobble", "with a fast vibrato"],
    },
}
PREFIXES = ["", "", "", "the sound of ", "you can hear ", "there is "]
# Adjective order before the noun (closest to the noun last), as English stacks them.
ADJECTIVE_ORDER = ("loudness", "duration", "envelope", "rate", "pitch")


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[rng.integers(len(options))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join_phrases(phrases: list[str]) -> str:
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _one_caption(spec: ClipSpec, rng: np.random.Generator, mention_all: bool) -> str:
    """One caption: a noun phrase with some attributes as adjectives, others as phrases."""
    attributes = [a for a in spec.labels if not a.startswith("sound:")]
    if not mention_all:
        k = int(rng.integers(2, len(attributes) + 1))
        attributes = [attributes[i] for i in sorted(rng.choice(len(attributes), k, False))]
    order = rng.permutation(len(attributes))
    as_adjective = {attributes[i] for i in order[: int(rng.integers(0, min(3, len(order)) + 1))]}
    adjectives = [
        _pick(rng, ADJECTIVES[a])
        for key in ADJECTIVE_ORDER
        for a in attributes
        if a.startswith(f"{key}:") and a in as_adjective
    ]
    phrases = []
    for i in order:
        a = attributes[i]
        if a in as_adjective:
            continue
        if a.startswith("rate:"):
            phrases.append(_pick(rng, RATE_PHRASES[spec.sound][a[len("rate:") :]]))
        else:
            phrases.append(_pick(rng, PHRASES[a]))
    noun, kind = NOUNS[spec.sound][rng.integers(len(NOUNS[spec.sound]))]
    head = " ".join([*adjectives, noun])
    if kind == "a":
        head = f"{_article(head)} {head}"
    prefix = _pick(rng, PREFIXES)
    if prefix == "there is " and kind == "pl":
        prefix = "there are "
    text = prefix + head
    if phrases:
        text += " " + _join_phrases(phrases)
    return text[0].upper() + text[1:]


def caption_clip(spec: ClipSpec) -> list[str]:
    """`spec.n_captions` distinct captions; the first mentions every attribute of the clip.

    The wording is drawn from the spec's seed, so it is as reproducible as the audio.
    """
    rng = np.random.default_rng([spec.seed, _STREAM_CAPTIONS])
    captions = [_one_caption(spec, rng, mention_all=True)]
    for _ in range(50 * spec.n_captions):
        if len(captions) == spec.n_captions:
            break
        candidate = _one_caption(spec, rng, mention_all=False)
        if candidate not in captions:
            captions.append(candidate)
    return captions


def assign_splits(cfg: SyntheticConfig) -> list[str]:
    """Split per clip: exact counts, chosen by ranking a per-clip random key."""
    n = cfg.n_clips
    keys = [_clip_rng(cfg.seed, i, _STREAM_SPLIT).uniform() for i in range(n)]
    n_test = round(n * cfg.test_fraction)
    n_val = round(n * cfg.val_fraction)
    if cfg.test_fraction > 0 and n_test == 0 and n >= 3:
        n_test = 1
    n_test = min(n_test, n - 1)
    if cfg.val_fraction > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    n_val = max(0, min(n_val, n - n_test - 1))
    splits = ["train"] * n
    for rank, i in enumerate(sorted(range(n), key=lambda j: (keys[j], j))):
        if rank < n_test:
            splits[i] = "test"
        elif rank < n_test + n_val:
            splits[i] = "val"
    return splits


def _captions_csv(rows: list[tuple[str, str, str, str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def generate_corpus(
    cfg: SyntheticConfig, root: str, storage_cfg: StorageConfig | None = None
) -> dict:
    """Write the corpus under `root` (local path or s3:// URI) and return a summary.

    The summary holds `n_clips`, `n_captions`, `seconds` (total audio, rounded to
    milliseconds), `splits` (clips per split) and `captions_uri`.
    """
    validate(cfg)
    splits = assign_splits(cfg)
    rows: list[tuple[str, str, str, str]] = []
    total_samples = 0
    for index in range(cfg.n_clips):
        spec = describe_clip(cfg, index)
        storage.write_bytes(
            storage.join(root, "audio", spec.file_name),
            encode_wav(render_clip(spec), cfg.sample_rate),
            storage_cfg,
        )
        total_samples += spec.n_samples
        labels = ";".join(spec.labels)
        for caption in caption_clip(spec):
            rows.append((spec.file_name, caption, splits[index], labels))
    captions_uri = storage.join(root, "captions.csv")
    storage.write_bytes(captions_uri, _captions_csv(rows), storage_cfg)
    return {
        "n_clips": cfg.n_clips,
        "n_captions": len(rows),
        "seconds": round(total_samples / cfg.sample_rate, 3),
        "splits": {s: splits.count(s) for s in ("train", "val", "test")},
        "captions_uri": captions_uri,
    }
