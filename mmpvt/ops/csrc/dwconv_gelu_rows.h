/* The per-row kernels of dwconv_gelu.c, compiled once per instruction set and map dtype:
 * dwconv_gelu_dtypes.h includes this one for each, with ISA(name) naming the copy,
 * ELEM the maps' element type with LOAD/STORE converting it to and from float, and a
 * `#pragma GCC target` in force, so that the channel loops vectorise to that width. All
 * arithmetic is float32; parameters, sums and the gy rows are float32 whatever ELEM is.
 *
 * Every channel loop reads its nine taps through nine pointers, each at a pixel of the map
 * or, for a tap that falls on the zero padding, at a row of zeros: no branch inside the
 * loop, and the sums stay in registers. */

/* exp(x) for x <= 0 (all GELU needs): Cephes' expf polynomial, clamped to stay normal. */
INLINE float ISA(exp_neg)(float x) {
    x = x < -87.0f ? -87.0f : x;
    /* Round to nearest by the 1.5 * 2^23 trick: branch-free, so the loops vectorise. */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Phi(y) = 0.5 * (1 + erf(y / sqrt 2)), given e = exp(-y^2 / 2) (the pdf needs it too). */
INLINE float ISA(normal_cdf)(float y, float e) {
    const float z = fabsf(y) * kSqrtHalf;
    const float t = 1.0f / (0.3275911f * z + 1.0f);
    const float r = (((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t
                    + 0.254829592f;
    const float erf_abs = 1.0f - r * t * e;
    return 0.5f * (1.0f + copysignf(erf_abs, y));
}

/* Forward of row r: a = GELU(conv(h)), into the (W, C) row a_row. */
static void ISA(fwd_row)(const Conv *cv, const ELEM *img, ELEM *out_row, int64_t r) {
    ELEM *restrict a_row = out_row;
    CONV_ROW(cv, img, r, {
        a_row[x * C + c] = STORE(v * ISA(normal_cdf)(v, ISA(exp_neg)(-0.5f * v * v)));
    });
}

/* gy = g * GELU'(conv(h)) of row r: the conv's output gradient, into the row buffer gy. */
static void ISA(grad_y_row)(const Conv *cv, const ELEM *img, const ELEM *g, float *gy, int64_t r) {
    const ELEM *restrict g_row = g + r * cv->W * cv->C;
    float *restrict gy_row = gy;
    CONV_ROW(cv, img, r, {
        const float e = ISA(exp_neg)(-0.5f * v * v);
        gy_row[x * C + c] = LOAD(g_row[x * C + c]) * (ISA(normal_cdf)(v, e) + v * kInvSqrt2Pi * e);
    });
}

/* Row r of h's gradient (the transposed conv of gy), into the (W, C) row grad_row, and its
 * share of the parameter gradients. gy_rows[k] is gy of row r + k - 1, NULL outside the map. */
static void ISA(bwd_row)(const Conv *cv, const ELEM *img, const float *const *gy_rows,
                         ELEM *grad_row, float *gw, float *gbc, float *gb1, int64_t r) {
    const int64_t H = cv->H, W = cv->W, C = cv->C;
    const ELEM *h_rows[3] = {r > 0 ? img + (r - 1) * W * C : NULL, img + r * W * C,
                              r < H - 1 ? img + (r + 1) * W * C : NULL};
    const float *restrict w0 = cv->w, *restrict w1 = w0 + C, *restrict w2 = w1 + C,
                          *restrict w3 = w2 + C, *restrict w4 = w3 + C, *restrict w5 = w4 + C,
                          *restrict w6 = w5 + C, *restrict w7 = w6 + C, *restrict w8 = w7 + C;
    float *restrict g0 = gw, *restrict g1 = g0 + C, *restrict g2 = g1 + C, *restrict g3 = g2 + C,
                    *restrict g4 = g3 + C, *restrict g5 = g4 + C, *restrict g6 = g5 + C,
                    *restrict g7 = g6 + C, *restrict g8 = g7 + C;
    float *restrict sum_bc = gbc, *restrict sum_b1 = gb1;
    for (int64_t x = 0; x < W; ++x) {
        /* Tap t = (dy, dx): the output at (r - dy, x - dx) read h here, and the output here
         * read h at (r + dy, x + dx). */
        const float *q[9], *bp[9];
        const ELEM *hp[9];
        for (int dy = 0; dy < 3; ++dy)
            for (int dx = 0; dx < 3; ++dx) {
                const int t = dy * 3 + dx;
                const int64_t xs = x - dx + 1, xh = x + dx - 1;
                const float *src = gy_rows[2 - dy];
                const ELEM *hrow = h_rows[dy];
                q[t] = (src != NULL && xs >= 0 && xs < W) ? src + xs * C : cv->zeros;
                const int inside = hrow != NULL && xh >= 0 && xh < W;
                hp[t] = inside ? hrow + xh * C : (const ELEM *)cv->zeros;
                bp[t] = inside ? cv->b1 : cv->zeros;
            }
        const float *restrict gyc = gy_rows[1] + x * C;
        ELEM *restrict gh = grad_row + x * C;
        {
            const float *restrict q0 = q[0], *restrict q1 = q[1], *restrict q2 = q[2],
                                  *restrict q3 = q[3], *restrict q4 = q[4], *restrict q5 = q[5],
                                  *restrict q6 = q[6], *restrict q7 = q[7], *restrict q8 = q[8];
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                const float s = w0[c] * q0[c] + w1[c] * q1[c] + w2[c] * q2[c] + w3[c] * q3[c]
                                + w4[c] * q4[c] + w5[c] * q5[c] + w6[c] * q6[c] + w7[c] * q7[c]
                                + w8[c] * q8[c];
                gh[c] = STORE(s);
                sum_b1[c] += s;
                sum_bc[c] += gyc[c];
            }
        }
        {
            const ELEM *restrict h0 = hp[0], *restrict h1 = hp[1], *restrict h2 = hp[2],
                                 *restrict h3 = hp[3], *restrict h4 = hp[4], *restrict h5 = hp[5],
                                 *restrict h6 = hp[6], *restrict h7 = hp[7], *restrict h8 = hp[8];
            const float *restrict b0 = bp[0], *restrict b1 = bp[1], *restrict b2 = bp[2],
                                  *restrict b3 = bp[3], *restrict b4 = bp[4], *restrict b5 = bp[5],
                                  *restrict b6 = bp[6], *restrict b7 = bp[7], *restrict b8 = bp[8];
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                const float d = gyc[c];
                g0[c] += d * (LOAD(h0[c]) + b0[c]);
                g1[c] += d * (LOAD(h1[c]) + b1[c]);
                g2[c] += d * (LOAD(h2[c]) + b2[c]);
                g3[c] += d * (LOAD(h3[c]) + b3[c]);
                g4[c] += d * (LOAD(h4[c]) + b4[c]);
                g5[c] += d * (LOAD(h5[c]) + b5[c]);
                g6[c] += d * (LOAD(h6[c]) + b6[c]);
                g7[c] += d * (LOAD(h7[c]) + b7[c]);
                g8[c] += d * (LOAD(h8[c]) + b8[c]);
            }
        }
    }
}
