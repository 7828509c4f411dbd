/* 2x2, stride-2, unpadded, floor-mode max-pool of contiguous float32 planes (NCHW: planes = N * C), forward
 * and backward. Plain C, no torch headers: danlu/kernels/maxpool.py compiles it with the system C compiler
 * on first use and calls it through ctypes on tensors' data pointers. Single-threaded.
 *
 * The winner of a window follows torch's CPU kernel (aten/src/ATen/native/cpu/MaxPoolKernel.cpp): the window
 * is read in row-major order, starting from -inf at its first element, and an element wins when it is
 * greater than the maximum so far or is NaN. So among equal maxima the first wins, a window of -infs keeps
 * its first element, and a window with NaNs keeps its last NaN. The winner is stored as its position in the
 * window, 0..3 (row * 2 + column), and the output is the winner's value, bit for bit. The backward writes
 * 0 + gradient at the winner (torch adds the gradient to zeros: -0 becomes +0) and 0 elsewhere; the rows and
 * columns that floor mode drops get 0.
 *
 * Comparisons are selects, not branches (on random data a branch is mispredicted about once a window), and
 * on x86-64 four windows at a time go through SSE2, which every x86-64 processor has; other processors run
 * the scalar loop, which computes the same.
 */
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Whether v takes the window from the maximum so far: torch's `val > maxval || isnan(val)`. */
#define WINS(v, best) (((v) > (best)) | ((v) != (v)))

/* One pair of input rows and what belongs to them: the forward reads top/bottom and writes out/where; the
 * backward reads grad/where and writes grad_top/grad_bottom. */
typedef struct {
    const float *top, *bottom;
    float *out;
    uint8_t *where;
    const float *grad;
    float *grad_top, *grad_bottom;
} Row;

typedef void (*Windows)(const Row *r, int64_t j);  /* computes window j (and, for four, j + 1 .. j + 3) */

/* Every window of a row: four at a time when there are four or more and `four` exists (the last four
 * overlap the ones before when OW is not a multiple of 4: recomputed windows get the same values), else
 * one at a time. */
static inline void each_window(const Row *r, int64_t OW, Windows four, Windows one) {
    if (four && OW >= 4) {
        for (int64_t j = 0; j + 4 <= OW; j += 4) four(r, j);
        if (OW % 4) four(r, OW - 4);
        return;
    }
    for (int64_t j = 0; j < OW; j++) one(r, j);
}

#if defined(__SSE2__)
static inline __m128 wins4(__m128 v, __m128 best) {  /* all ones where WINS(v, best) */
    return _mm_or_ps(_mm_cmpgt_ps(v, best), _mm_cmpunord_ps(v, v));
}

static inline __m128 select4(__m128 mask, __m128 yes, __m128 no) {
    return _mm_or_ps(_mm_and_ps(mask, yes), _mm_andnot_ps(mask, no));
}

static inline __m128i select4i(__m128i mask, __m128i yes, __m128i no) {
    return _mm_or_si128(_mm_and_si128(mask, yes), _mm_andnot_si128(mask, no));
}

/* The winners and maxima of four windows from their elements a, b, c, d (in window order); the first
 * element beats the starting -inf unless it is -inf, and then it stays the winner. */
static inline __m128 window4(__m128 a, __m128 b, __m128 c, __m128 d, __m128i *k) {
    const __m128 take_b = wins4(b, a), ab = select4(take_b, b, a);
    const __m128 take_c = wins4(c, ab), abc = select4(take_c, c, ab);
    const __m128 take_d = wins4(d, abc);
    *k = _mm_and_si128(_mm_castps_si128(take_b), _mm_set1_epi32(1));
    *k = select4i(_mm_castps_si128(take_c), _mm_set1_epi32(2), *k);
    *k = select4i(_mm_castps_si128(take_d), _mm_set1_epi32(3), *k);
    return select4(take_d, d, abc);
}

static void forward4(const Row *r, int64_t j) {
    const __m128 t0 = _mm_loadu_ps(r->top + 2 * j), t1 = _mm_loadu_ps(r->top + 2 * j + 4);
    const __m128 b0 = _mm_loadu_ps(r->bottom + 2 * j), b1 = _mm_loadu_ps(r->bottom + 2 * j + 4);
    const __m128 a = _mm_shuffle_ps(t0, t1, _MM_SHUFFLE(2, 0, 2, 0)), b = _mm_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 1, 3, 1));
    const __m128 c = _mm_shuffle_ps(b0, b1, _MM_SHUFFLE(2, 0, 2, 0)), d = _mm_shuffle_ps(b0, b1, _MM_SHUFFLE(3, 1, 3, 1));
    __m128i k;
    _mm_storeu_ps(r->out + j, window4(a, b, c, d, &k));
    k = _mm_packs_epi32(k, k);   /* 4 x int32 -> 4 x int16 */
    k = _mm_packus_epi16(k, k);  /* -> 4 x uint8 */
    const int32_t bytes = _mm_cvtsi128_si32(k);
    memcpy(r->where + j, &bytes, 4);
}

/* Window j alone, in the first lane: the scalar compiler output branches on each comparison. */
static void forward1(const Row *r, int64_t j) {
    __m128i k;
    _mm_store_ss(r->out + j, window4(_mm_load_ss(r->top + 2 * j), _mm_load_ss(r->top + 2 * j + 1),
                                     _mm_load_ss(r->bottom + 2 * j), _mm_load_ss(r->bottom + 2 * j + 1), &k));
    r->where[j] = (uint8_t)_mm_cvtsi128_si32(k);
}

/* The gradients of four windows' elements: v where the winner k is that element, else 0. */
static inline void grads4(__m128i k, __m128 v, __m128 *v0, __m128 *v1, __m128 *v2, __m128 *v3) {
    *v0 = _mm_and_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(k, _mm_set1_epi32(0))), v);
    *v1 = _mm_and_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(k, _mm_set1_epi32(1))), v);
    *v2 = _mm_and_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(k, _mm_set1_epi32(2))), v);
    *v3 = _mm_and_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(k, _mm_set1_epi32(3))), v);
}

static void backward4(const Row *r, int64_t j) {
    int32_t bytes;
    memcpy(&bytes, r->where + j, 4);
    __m128i k = _mm_cvtsi32_si128(bytes);
    k = _mm_unpacklo_epi8(k, _mm_setzero_si128());
    k = _mm_unpacklo_epi16(k, _mm_setzero_si128());  /* 4 x int32 */
    __m128 v0, v1, v2, v3;
    grads4(k, _mm_add_ps(_mm_setzero_ps(), _mm_loadu_ps(r->grad + j)), &v0, &v1, &v2, &v3);
    _mm_storeu_ps(r->grad_top + 2 * j, _mm_unpacklo_ps(v0, v1));
    _mm_storeu_ps(r->grad_top + 2 * j + 4, _mm_unpackhi_ps(v0, v1));
    _mm_storeu_ps(r->grad_bottom + 2 * j, _mm_unpacklo_ps(v2, v3));
    _mm_storeu_ps(r->grad_bottom + 2 * j + 4, _mm_unpackhi_ps(v2, v3));
}

static void backward1(const Row *r, int64_t j) {
    __m128 v0, v1, v2, v3;
    grads4(_mm_cvtsi32_si128(r->where[j]), _mm_add_ss(_mm_setzero_ps(), _mm_load_ss(r->grad + j)), &v0, &v1, &v2, &v3);
    _mm_store_ss(r->grad_top + 2 * j, v0);
    _mm_store_ss(r->grad_top + 2 * j + 1, v1);
    _mm_store_ss(r->grad_bottom + 2 * j, v2);
    _mm_store_ss(r->grad_bottom + 2 * j + 1, v3);
}

#define FORWARD4 forward4
#define BACKWARD4 backward4
#else
static void forward1(const Row *r, int64_t j) {
    const float a = r->top[2 * j], b = r->top[2 * j + 1], c = r->bottom[2 * j], d = r->bottom[2 * j + 1];
    const int take_b = WINS(b, a);
    const float ab = take_b ? b : a;
    const int take_c = WINS(c, ab);
    const float abc = take_c ? c : ab;
    const int take_d = WINS(d, abc);
    r->out[j] = take_d ? d : abc;
    r->where[j] = (uint8_t)(take_d ? 3 : take_c ? 2 : take_b);
}

static void backward1(const Row *r, int64_t j) {
    const int k = r->where[j];
    const float v = 0.0f + r->grad[j];
    r->grad_top[2 * j] = k == 0 ? v : 0.0f;
    r->grad_top[2 * j + 1] = k == 1 ? v : 0.0f;
    r->grad_bottom[2 * j] = k == 2 ? v : 0.0f;
    r->grad_bottom[2 * j + 1] = k == 3 ? v : 0.0f;
}

#define FORWARD4 0
#define BACKWARD4 0
#endif

/* x: (planes, H, W); out and where: (planes, H / 2, W / 2). */
void danlu_maxpool2x2_forward(const float *x, float *out, uint8_t *where, int64_t planes, int64_t H, int64_t W) {
    const int64_t OH = H / 2, OW = W / 2;
    for (int64_t p = 0; p < planes; p++) {
        for (int64_t i = 0; i < OH; i++) {
            const float *top = x + p * H * W + 2 * i * W;
            const Row r = {top, top + W, out + (p * OH + i) * OW, where + (p * OH + i) * OW, 0, 0, 0};
            each_window(&r, OW, FORWARD4, forward1);
        }
    }
}

/* grad_out and where: (planes, H / 2, W / 2); grad_in: (planes, H, W), every element written. */
void danlu_maxpool2x2_backward(const float *grad_out, uint8_t *where, float *grad_in, int64_t planes, int64_t H,
                               int64_t W) {
    const int64_t OH = H / 2, OW = W / 2;
    for (int64_t p = 0; p < planes; p++) {
        float *plane = grad_in + p * H * W;
        for (int64_t i = 0; i < OH; i++) {
            float *top = plane + 2 * i * W;
            const Row r = {0, 0, 0, where + (p * OH + i) * OW, grad_out + (p * OH + i) * OW, top, top + W};
            each_window(&r, OW, BACKWARD4, backward1);
            if (W & 1) {
                top[W - 1] = 0.0f;
                top[2 * W - 1] = 0.0f;
            }
        }
        if (H & 1) memset(plane + (H - 1) * W, 0, (size_t)W * sizeof(float));
    }
}
