"""LASS (GPA eqs 2-8) as one fused C loop per audio x text pair: the bias job's fast path.

`LASSScorer.reduce_first` makes a few dozen passes of torch ops over [K+1, K+1, pairs]
planes and its 80 exponentials per pair; on CPU that costs a third of the score's matrix
products. This kernel reads each pair's s_p once from the prototype product, keeps all of
LASS in registers (16 pairs per vector, along the contiguous text axis) and writes one
float32 score. It computes exactly the plain path's math in float32 (every softmax
subtracts its maximum, L_a/L_t are applied as W v + b), only with a Cephes-style exp
(~1 ulp) and its own summation order, so it agrees with the plain path to ~1e-6; the plain
path stays the parity reference (tests/models/test_fused_lass.py).

The C source below is compiled once per machine with the system C compiler (`cc`, -O3
-march=native, no fast-math), cached under the temp directory keyed by the source, flags,
K and host, and loaded with ctypes; calls release the GIL, so `lass_scores` splits the
audio rows over `torch.get_num_threads()` threads. Without a working compiler `available`
is False and callers keep the plain path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

COMPILER = os.environ.get("CC", "cc")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-std=c11")

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define LANES 16
#define KMAX (KA > KT ? KA : KT)

/* LANES pairs at once (GCC vector extensions: AVX-512, or two AVX2 halves). */
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

static inline vf splat(float x) { return (vf){0} + x; }

static inline vf vmax(vf a, vf b) {
    vi take_a = a > b;
    return (vf)(((vi)a & take_a) | ((vi)b & ~take_a));
}

/* exp per lane (Cephes expf: 2^n * p(r), |r| <= ln2 / 2, ~1 ulp). */
static inline vf vexp(vf x) {
    x = vmax(x, splat(-87.0f));
    x = -vmax(-x, splat(-88.0f));
    vf t = x * 1.44269504088896341f + 12582912.0f;
    vf n = t - 12582912.0f;
    vf scale = (vf)(((vi)t - 0x4B400000 + 127) << 23);
    vf r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * scale;
}

/* softmax over v[0..k), per lane, its maximum subtracted as torch.softmax does. */
static inline void softmax(vf *v, int k) {
    vf top = v[0], total = splat(0.0f);
    for (int p = 1; p < k; p++) top = vmax(top, v[p]);
    for (int p = 0; p < k; p++) {
        v[p] = vexp(v[p] - top);
        total += v[p];
    }
    vf inverse = 1.0f / total;
    for (int p = 0; p < k; p++) v[p] *= inverse;
}

/* v <- softmax(W v + b) (W [k][k] row-major: nn.Linear's weight). */
static inline void remap(vf *v, int k, const float *w, const float *b) {
    vf mapped[KMAX];
    for (int p = 0; p < k; p++) {
        mapped[p] = splat(b[p]);
        for (int q = 0; q < k; q++) mapped[p] += w[p * k + q] * v[q];
    }
    for (int p = 0; p < k; p++) v[p] = mapped[p];
    softmax(v, k);
}

/* Stage-1 weights of both branches: audio[i][j] = softmax_i x[i][j] (per column j),
   text[i][j] = softmax_j x[i][j] (per row i). Both share exp(x - pair maximum), exact
   as long as no entry is more than 80 below its pair's maximum (prototype cosines
   differ by at most 2); otherwise every column and row is shifted by its own maximum. */
static inline void stage_one(vf x[KA][KT], vf audio[KA][KT], vf text[KA][KT]) {
    vf top = x[0][0], low = x[0][0];
    for (int i = 0; i < KA; i++)
        for (int j = 0; j < KT; j++) {
            top = vmax(top, x[i][j]);
            low = -vmax(-low, -x[i][j]);
        }
    vi far = (top - low) > 80.0f;
    int any_far = 0;
    for (int l = 0; l < LANES; l++) any_far |= far[l];
    if (any_far) {
        vf column[KA], row[KT];
        for (int j = 0; j < KT; j++) {
            for (int i = 0; i < KA; i++) column[i] = x[i][j];
            softmax(column, KA);
            for (int i = 0; i < KA; i++) audio[i][j] = column[i];
        }
        for (int i = 0; i < KA; i++) {
            for (int j = 0; j < KT; j++) row[j] = x[i][j];
            softmax(row, KT);
            for (int j = 0; j < KT; j++) text[i][j] = row[j];
        }
        return;
    }
    vf e[KA][KT], col_sum[KT], row_sum[KA];
    for (int j = 0; j < KT; j++) col_sum[j] = splat(0.0f);
    for (int i = 0; i < KA; i++) {
        row_sum[i] = splat(0.0f);
        for (int j = 0; j < KT; j++) {
            e[i][j] = vexp(x[i][j] - top);
            row_sum[i] += e[i][j];
            col_sum[j] += e[i][j];
        }
    }
    for (int j = 0; j < KT; j++) col_sum[j] = 1.0f / col_sum[j];
    for (int i = 0; i < KA; i++) row_sum[i] = 1.0f / row_sum[i];
    for (int i = 0; i < KA; i++)
        for (int j = 0; j < KT; j++) {
            audio[i][j] = e[i][j] * col_sum[j];
            text[i][j] = e[i][j] * row_sum[i];
        }
}

/* One LASS branch on x [KA][KT] with its stage-1 weights w0: pool over the audio axis
   with (w1, b1), then over the text axis with (w2, b2); transposed: text axis first. */
static inline vf branch(vf x[KA][KT], vf w0[KA][KT], int transposed, const float *w1,
                        const float *b1, const float *w2, const float *b2) {
    int k1 = transposed ? KT : KA, k2 = transposed ? KA : KT;
    vf pooled[KMAX], v[KMAX], out = splat(0.0f);
    for (int q = 0; q < k2; q++) {
        for (int p = 0; p < k1; p++) v[p] = transposed ? w0[q][p] : w0[p][q];
        remap(v, k1, w1, b1);
        pooled[q] = splat(0.0f);
        for (int p = 0; p < k1; p++) pooled[q] += v[p] * (transposed ? x[q][p] : x[p][q]);
    }
    for (int q = 0; q < k2; q++) v[q] = pooled[q];
    softmax(v, k2);
    remap(v, k2, w2, b2);
    for (int q = 0; q < k2; q++) out += v[q] * pooled[q];
    return out;
}

/* S'_p of audio rows [a0, a1) x every text. prod is the prototype product in the
   embeddings' own layout, [n_audio * KA, n_text * KT] (row a * KA + i, column t * KT + j);
   out [n_audio, n_text]. wa/ba: L_a (KA x KA), wt/bt: L_t (KT x KT). */
void lass_rows(const float *prod, int64_t n_audio, int64_t n_text, int64_t a0, int64_t a1,
               const float *wa, const float *ba, const float *wt, const float *bt,
               float *out) {
    vf x[KA][KT], audio[KA][KT], text[KA][KT];
    float lanes[KT][LANES];
    for (int64_t a = a0; a < a1; a++) {
        for (int64_t t0 = 0; t0 < n_text; t0 += LANES) {
            int64_t n = n_text - t0 < LANES ? n_text - t0 : LANES;
            for (int i = 0; i < KA; i++) {
                const float *src = prod + ((a * KA + i) * n_text + t0) * KT;
                if (n == LANES) {
                    for (int l = 0; l < LANES; l++)
                        for (int j = 0; j < KT; j++) lanes[j][l] = src[l * KT + j];
                } else {
                    for (int l = 0; l < LANES; l++)
                        for (int j = 0; j < KT; j++) lanes[j][l] = l < n ? src[l * KT + j] : 0.0f;
                }
                for (int j = 0; j < KT; j++) memcpy(&x[i][j], lanes[j], sizeof x[i][j]);
            }
            stage_one(x, audio, text);
            vf s = branch(x, audio, 0, wa, ba, wt, bt) + branch(x, text, 1, wt, bt, wa, ba);
            memcpy(out + a * n_text + t0, &s, sizeof(float) * n);
        }
    }
}
"""


def _cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"gpa_ray_kernels_{os.getuid()}"


@functools.cache
def _library(n_audio: int, n_text: int) -> ctypes.CDLL | None:
    """The kernel compiled for Ka = `n_audio`, Kt = `n_text` prototypes (once per machine,
    then loaded from the cache); None if it cannot be built here."""
    defines = (f"-DKA={n_audio}", f"-DKT={n_text}")
    key = "\0".join([SOURCE, COMPILER, *FLAGS, *defines, platform.node(), platform.machine()])
    path = _cache_dir() / f"lass_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not path.exists():
        source = path.with_suffix(f".{os.getpid()}.c")
        partial = path.with_suffix(f".{os.getpid()}.so")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            source.write_text(SOURCE)
            subprocess.run(
                [COMPILER, *FLAGS, *defines, str(source), "-o", str(partial)],
                check=True,
                capture_output=True,
                text=True,
                timeout=120,
            )
            os.replace(partial, path)  # atomic: concurrent processes never load a partial file
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", "") or error
            logger.warning("fused LASS kernel unavailable (%s); using the plain path", detail)
            return None
        finally:
            source.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
    library = ctypes.CDLL(str(path))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.lass_rows.argtypes = [pointer, size, size, size, size, *[pointer] * 5]
    library.lass_rows.restype = None
    return library


def available(n_audio: int, n_text: int) -> bool:
    """Whether the fused kernel for this many prototypes builds and loads on this machine."""
    return _library(n_audio, n_text) is not None


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fused-lass")


def lass_scores(
    audio_prototypes: Tensor, text_prototypes: Tensor, l_a: torch.nn.Linear, l_t: torch.nn.Linear
) -> Tensor:
    """S'_p [A, T] of LASS with layers `l_a`, `l_t` for prototypes [A, Ka, D] x [T, Kt, D],
    float32 on CPU, forward only. Raises RuntimeError if the kernel is unavailable."""
    n_audio, ka, dim = audio_prototypes.shape
    n_text, kt, _ = text_prototypes.shape
    library = _library(ka, kt)
    if library is None:
        raise RuntimeError("the fused LASS kernel could not be built on this machine")
    # The embeddings' own layout (a view for contiguous inputs, no copy): row a * Ka + i,
    # column t * Kt + j. One matrix product, as `prototype_similarity_first` makes.
    audio = audio_prototypes.detach().float().reshape(n_audio * ka, dim)
    text = text_prototypes.detach().float().reshape(n_text * kt, dim)
    prod = (audio @ text.T).contiguous()
    params = [p.detach().float().contiguous() for p in (l_a.weight, l_a.bias, l_t.weight, l_t.bias)]
    out = torch.empty(n_audio, n_text, dtype=torch.float32)
    threads = max(1, min(torch.get_num_threads(), n_audio))
    bounds = [n_audio * i // threads for i in range(threads + 1)]
    args = [prod.data_ptr(), n_audio, n_text]
    tail = [*(p.data_ptr() for p in params), out.data_ptr()]
    if threads == 1:
        library.lass_rows(*args, 0, n_audio, *tail)
    else:
        calls = [
            _pool(threads).submit(library.lass_rows, *args, bounds[i], bounds[i + 1], *tail)
            for i in range(threads)
        ]
        for call in calls:
            call.result()
    return out
