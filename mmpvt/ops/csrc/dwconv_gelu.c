/* PVTv2's MLP middle, fused: a = GELU(dwconv3x3(h + b1) + bc), forward and backward.
 *
 * Maps are channels-last float32, (B, H, W, C) contiguous: the (B, N, C) output of fc1 as
 * it is. `b1` is fc1's bias (added to the map, not to the zero padding), `w` the depthwise
 * weights as (9, C) (tap-major, so the channel loop is contiguous), `bc` the conv's bias;
 * either bias may be NULL.
 *
 * Why fused: on a CPU these steps are bound by memory traffic, not arithmetic. Unfused, the
 * forward writes the conv output, reads it back for GELU and writes GELU's output; the
 * backward reads GELU's input and incoming gradient, writes the conv's gradient, reads it
 * twice more (input and weight gradients) and writes the input gradient. Fused, the forward
 * reads h and writes a, and the backward reads h and the incoming gradient and writes h's
 * gradient: the pre-activation is recomputed row by row in cache instead of being stored.
 *
 * GELU is the exact (erf) one, computed as ATen's vectorised CPU kernels do (the
 * Abramowitz-Stegun erf with a Cephes exp), so results agree with PyTorch's to float
 * rounding. Threads split rows; each thread reduces its own weight and bias gradients and
 * the caller's partial buffers are summed in thread order, so a run is deterministic for a
 * given thread count.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

static const float kSqrtHalf = 0.70710678118654752f;
static const float kInvSqrt2Pi = 0.39894228040143268f;

/* What every row kernel reads. */
typedef struct {
    const float *w;     /* (9, C) taps */
    const float *b1;    /* (C) fc1's bias, or zeros */
    const float *cb;    /* (16, C): conv bias + fc1 bias through the taps inside the map */
    const float *zeros; /* (C) zeros: what a tap on the padding reads (as float or bf16) */
    int64_t H, W, C;
} Conv;

/* Pre-activation of row r, one pixel at a time, handed to `emit` as (x, c, value).
 * Output (r, x) reads h at (r + dy, x + dx) through tap t = (dy + 1) * 3 + dx + 1; fc1's
 * bias reaches it only through the taps inside the map, which cv->cb holds per border case. */
#define CONV_ROW(cv, img, r, BODY)                                                          \
    do {                                                                                        \
        const int64_t H_ = (cv)->H, W_ = (cv)->W, C = (cv)->C;                                  \
        const ELEM *rows_[3] = {(r) > 0 ? (img) + ((r) - 1) * W_ * C : NULL,                  \
                                 (img) + (r) * W_ * C,                                          \
                                 (r) < H_ - 1 ? (img) + ((r) + 1) * W_ * C : NULL};             \
        const float *restrict w0 = (cv)->w, *restrict w1 = w0 + C, *restrict w2 = w1 + C,      \
                              *restrict w3 = w2 + C, *restrict w4 = w3 + C,                    \
                              *restrict w5 = w4 + C, *restrict w6 = w5 + C,                    \
                              *restrict w7 = w6 + C, *restrict w8 = w7 + C;                    \
        for (int64_t x = 0; x < W_; ++x) {                                                      \
            const ELEM *p_[9];                                                                  \
            for (int dy = 0; dy < 3; ++dy)                                                      \
                for (int dx = 0; dx < 3; ++dx) {                                                \
                    const int64_t xx = x + dx - 1;                                              \
                    p_[dy * 3 + dx] = (rows_[dy] != NULL && xx >= 0 && xx < W_)                 \
                                          ? rows_[dy] + xx * C : (const ELEM *)(cv)->zeros;    \
                }                                                                               \
            const int case_ = (rows_[0] != NULL) | (rows_[2] != NULL) << 1 | (x > 0) << 2      \
                              | (x < W_ - 1) << 3;                                              \
            const float *restrict cb = (cv)->cb + case_ * C;                                    \
            const ELEM *restrict p0 = p_[0], *restrict p1 = p_[1], *restrict p2 = p_[2],        \
                             *restrict p3 = p_[3], *restrict p4 = p_[4],                       \
                             *restrict p5 = p_[5], *restrict p6 = p_[6],                       \
                             *restrict p7 = p_[7], *restrict p8 = p_[8];                       \
            _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) {                               \
                const float v = cb[c] + w0[c] * LOAD(p0[c]) + w1[c] * LOAD(p1[c])               \
                                + w2[c] * LOAD(p2[c]) + w3[c] * LOAD(p3[c])                     \
                                + w4[c] * LOAD(p4[c]) + w5[c] * LOAD(p5[c])                     \
                                + w6[c] * LOAD(p6[c]) + w7[c] * LOAD(p7[c])                     \
                                + w8[c] * LOAD(p8[c]);                                          \
                BODY                                                                            \
            }                                                                                   \
        }                                                                                       \
    } while (0)

/* The maps' element types: float32, and bfloat16 (autocast) as its upper 16 bits. */
INLINE float bf16_load(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

INLINE uint16_t bf16_store(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : rounded;
}

/* One copy of the row kernels per instruction set and dtype, the instruction set picked at
 * run time by CPU features (not by CPU model, which GCC's target_clones("arch=...") tests),
 * or forced by MMPVT_DWCONV_GELU_ISA / mmpvt_dwconv_gelu_select to test every copy. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define ISA_SUFFIX avx512
#include "dwconv_gelu_dtypes.h"
#undef ISA_SUFFIX
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define ISA_SUFFIX avx2
#include "dwconv_gelu_dtypes.h"
#undef ISA_SUFFIX
#pragma GCC pop_options
#define HAVE_X86_VARIANTS 1
#endif
#define ISA_SUFFIX base
#include "dwconv_gelu_dtypes.h"
#undef ISA_SUFFIX

/* The row kernels in use, per dtype: 0 float32, 1 bfloat16. Maps are passed as void *. */
typedef void (*fwd_row_fn)(const Conv *, const void *, void *, int64_t);
typedef void (*grad_y_row_fn)(const Conv *, const void *, const void *, float *, int64_t);
typedef void (*bwd_row_fn)(const Conv *, const void *, const float *const *, void *, float *,
                           float *, float *, int64_t);

static struct {
    fwd_row_fn fwd_row[2];
    grad_y_row_fn grad_y_row[2];
    bwd_row_fn bwd_row[2];
    const char *name;
} kernels;

#define USE(isa)                                                          \
    do {                                                                  \
        kernels.fwd_row[0] = (fwd_row_fn)fwd_row_##isa##_f32;             \
        kernels.fwd_row[1] = (fwd_row_fn)fwd_row_##isa##_bf16;            \
        kernels.grad_y_row[0] = (grad_y_row_fn)grad_y_row_##isa##_f32;    \
        kernels.grad_y_row[1] = (grad_y_row_fn)grad_y_row_##isa##_bf16;   \
        kernels.bwd_row[0] = (bwd_row_fn)bwd_row_##isa##_f32;             \
        kernels.bwd_row[1] = (bwd_row_fn)bwd_row_##isa##_bf16;            \
        kernels.name = #isa;                                              \
    } while (0)

/* The instruction sets, best first, by the names MMPVT_DWCONV_GELU_ISA and
 * mmpvt_dwconv_gelu_select take. */
static const char *const kIsaNames[] = {"avx512", "avx2", "base"};
enum { kNumIsas = 3, kBaseIsa = 2 };

/* Whether this build has copy k of the kernels and this CPU can run it. */
static int isa_runs_here(int k) {
#ifdef HAVE_X86_VARIANTS
    __builtin_cpu_init();
    if (k == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    if (k == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return k == kBaseIsa;
}

static void use_isa(int k) {
#ifdef HAVE_X86_VARIANTS
    if (k == 0) {
        USE(avx512);
        return;
    }
    if (k == 1) {
        USE(avx2);
        return;
    }
#endif
    (void)k;
    USE(base);
}

static int isa_index(const char *name) {
    for (int k = 0; k < kNumIsas; ++k)
        if (strcmp(name, kIsaNames[k]) == 0) return k;
    return -1;
}

/* 1 when this CPU (and build) can run the kernels of instruction set `name`, 0 when it
 * cannot, -1 when `name` is none of "avx512", "avx2", "base". */
int mmpvt_dwconv_gelu_supports(const char *name) {
    const int k = isa_index(name);
    return k < 0 ? -1 : isa_runs_here(k);
}

/* Selects the copy of the kernels later calls run. `name` is "avx512", "avx2" or "base";
 * NULL or "auto" is the default: the set named by the environment variable
 * MMPVT_DWCONV_GELU_ISA when it is set and not empty, else the best this CPU runs.
 * Returns 0; -1 for an unknown name, -2 for a set this CPU or build cannot run (the
 * selection is then left as it was). */
int mmpvt_dwconv_gelu_select(const char *name) {
    if (name == NULL || strcmp(name, "auto") == 0) {
        const char *env = getenv("MMPVT_DWCONV_GELU_ISA");
        name = env != NULL && env[0] != '\0' ? env : "auto";
    }
    int k = 0;
    if (strcmp(name, "auto") == 0) {
        while (!isa_runs_here(k)) ++k; /* ends at base, which always runs */
    } else {
        k = isa_index(name);
        if (k < 0) return -1;
        if (!isa_runs_here(k)) return -2;
    }
    use_isa(k);
    return 0;
}

/* Makes the default selection on first use. Returns 0, or the failed selection's status
 * (MMPVT_DWCONV_GELU_ISA names an unknown set or one this CPU cannot run). */
static int pick_kernels(void) {
    return kernels.name != NULL ? 0 : mmpvt_dwconv_gelu_select(NULL);
}

/* Which copy of the kernels runs: "avx512", "avx2" or "base"; NULL when the default
 * selection failed (see pick_kernels). */
const char *mmpvt_dwconv_gelu_isa(void) {
    return pick_kernels() == 0 ? kernels.name : NULL;
}

/* Fills cv and its (17, C) buffer: 16 border cases of the constant term, then zeros. The
 * case's bits say which of the rows above/below and columns left/right are in the map. */
static float *make_conv(Conv *cv, const float *w, const float *b1, const float *bc, int64_t H,
                        int64_t W, int64_t C) {
    float *buf = calloc((size_t)(18 * C), sizeof(float));
    if (buf == NULL) return NULL;
    float *cb = buf, *zeros = buf + 16 * C, *b1v = buf + 17 * C;
    if (b1 != NULL) memcpy(b1v, b1, (size_t)C * sizeof(float));
    for (int k = 0; k < 16; ++k) {
        const int row_ok[3] = {k & 1, 1, (k >> 1) & 1}, col_ok[3] = {(k >> 2) & 1, 1, (k >> 3) & 1};
        for (int64_t c = 0; c < C; ++c) {
            float taps = 0.0f;
            for (int dy = 0; dy < 3; ++dy)
                for (int dx = 0; dx < 3; ++dx)
                    if (row_ok[dy] && col_ok[dx]) taps += w[(dy * 3 + dx) * C + c];
            cb[k * C + c] = (bc != NULL ? bc[c] : 0.0f) + b1v[c] * taps;
        }
    }
    *cv = (Conv){w, b1v, cb, zeros, H, W, C};
    return buf;
}

/* Threads take contiguous ranges of the B * H rows: neighbours share cached rows of h. */
static int64_t split(int64_t n, int t, int nt) { return n * t / nt; }

/* Bytes per element of the maps of each dtype code. */
static const int64_t kElemSize[2] = {4, 2};

/* a = GELU(dwconv3x3(h + b1) + bc) for the B maps (H, W, C), into out (B, H, W, C), on
 * `threads` threads. Maps h and out are float32 (dtype 0) or bfloat16 (dtype 1); w, b1 and
 * bc are float32. Returns 0, -1 when out of memory, -2 for an unknown dtype, -3 when
 * MMPVT_DWCONV_GELU_ISA asks for kernels this CPU cannot run (see pick_kernels). */
int mmpvt_dwconv_gelu_forward(const void *h, const float *b1, const float *w, const float *bc,
                              void *out, int64_t B, int64_t H, int64_t W, int64_t C,
                              int64_t dtype, int64_t threads) {
    if (dtype != 0 && dtype != 1) return -2;
    if (pick_kernels() != 0) return -3;
    const int64_t es = kElemSize[dtype];
    const fwd_row_fn fwd_row = kernels.fwd_row[dtype];
    Conv cv;
    float *buf = make_conv(&cv, w, b1, bc, H, W, C);
    if (buf == NULL) return -1;
#pragma omp parallel num_threads((int)threads)
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t begin = split(B * H, t, nt), end = split(B * H, t + 1, nt);
        for (int64_t i = begin; i < end; ++i) {
            fwd_row(&cv, (const char *)h + i / H * H * W * C * es, (char *)out + i * W * C * es,
                    i % H);
        }
    }
    free(buf);
    return 0;
}

/* Gradients of the forward above given g = dL/da: grad_h (B, H, W, C), of the maps' dtype
 * as h and g, and, summed over all pixels in float32, grad_w (9, C), grad_bc (C) and
 * grad_b1 (C). `partials` holds 11 * C floats per thread (at least `threads` of them) for
 * the per-thread sums. Returns 0, -1 when out of memory, -2 for an unknown dtype, -3 as
 * for the forward. */
int mmpvt_dwconv_gelu_backward(const void *h, const void *g, const float *b1, const float *w,
                               const float *bc, void *grad_h, float *grad_w, float *grad_bc,
                               float *grad_b1, float *partials, int64_t B, int64_t H, int64_t W,
                               int64_t C, int64_t dtype, int64_t threads) {
    if (dtype != 0 && dtype != 1) return -2;
    if (pick_kernels() != 0) return -3;
    const int64_t es = kElemSize[dtype];
    const grad_y_row_fn grad_y_row = kernels.grad_y_row[dtype];
    const bwd_row_fn bwd_row = kernels.bwd_row[dtype];
    Conv cv;
    float *buf = make_conv(&cv, w, b1, bc, H, W, C);
    if (buf == NULL) return -1;
    int failed = 0, used = 1;
#pragma omp parallel num_threads((int)threads) reduction(| : failed)
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        if (t == 0) used = nt;
        float *part = partials + (int64_t)t * 11 * C;
        memset(part, 0, (size_t)(11 * C) * sizeof(float));
        /* A ring of three gy rows and the (map, row) index each slot holds: each row's gy
         * is computed once per thread, and reused by the rows above and below it. */
        float *ring = malloc((size_t)(3 * W * C) * sizeof(float));
        int64_t held[3] = {-1, -1, -1};
        if (ring == NULL) {
            failed = 1;
        } else {
            const int64_t begin = split(B * H, t, nt), end = split(B * H, t + 1, nt);
            for (int64_t i = begin; i < end; ++i) {
                const int64_t b = i / H, r = i % H;
                const char *img = (const char *)h + b * H * W * C * es;
                const char *gimg = (const char *)g + b * H * W * C * es;
                const float *gy[3];
                for (int k = 0; k < 3; ++k) {
                    const int64_t rr = r + k - 1, id = b * H + rr, slot = id % 3;
                    gy[k] = NULL;
                    if (rr < 0 || rr >= H) continue;
                    float *dst = ring + slot * W * C;
                    if (held[slot] != id) {
                        grad_y_row(&cv, img, gimg, dst, rr);
                        held[slot] = id;
                    }
                    gy[k] = dst;
                }
                bwd_row(&cv, img, gy, (char *)grad_h + i * W * C * es, part, part + 9 * C,
                        part + 10 * C, r);
            }
            free(ring);
        }
    }
    free(buf);
    if (failed) return -1;
    /* In thread order, so that the sums do not depend on which thread finished first. */
    for (int64_t k = 0; k < 11 * C; ++k) {
        float s = 0.0f;
        for (int t = 0; t < used; ++t) s += partials[(int64_t)t * 11 * C + k];
        if (k < 9 * C) grad_w[k] = s;
        else if (k < 10 * C) grad_bc[k - 9 * C] = s;
        else grad_b1[k - 10 * C] = s;
    }
    return 0;
}
