/* Pillow's bicubic resize of a window of an 8-bit RGB image (Image.resize(size, BICUBIC, box)), bit for bit.
 *
 * Same coefficients (double precision, 22-bit fixed point), same two passes in the same order through an 8-bit
 * intermediate, same rounding and clipping as Pillow 13's libImaging/Resample.c. What differs is the
 * loop order: each pass runs as "output line = sum of input lines * coefficients" over whole contiguous lines (AVX2,
 * 32 bytes at a time with their sums in registers, when the CPU has it; plain C otherwise), and the horizontal
 * pass does so on transposed strips of the input. The sums are exact integers, so their order does not matter.
 * A 384 x 384 window: Pillow's scalar loops about 5.5-7 ms on one core of the CI machine, this about 1 ms
 * (benchmarks/pixel_ops.py).
 *
 * Python: resize(src, w, h, (x0, y0, x1, y1), dst, out_w, out_h[, avx2=True]) with src a C-contiguous uint8 (h, w, 3) buffer
 * and dst a writable uint8 (out_h, out_w, 3) one; box coordinates are cast to float as Pillow's are.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS (32 - 8 - 2)

static double bicubic_filter(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc for the bicubic filter (support 2). bounds holds (first
 * input index, taps) per output index; kk holds ksize fixed-point taps per output index. Returns ksize, 0 if out
 * of memory. */
static int coeffs(int in_size, float in0, float in1, int out_size, int **boundsp, int32_t **kkp) {
    double filterscale, scale;
    filterscale = scale = (double)(in1 - in0) / out_size;
    if (filterscale < 1.0) filterscale = 1.0;
    const double support = 2.0 * filterscale;
    const int ksize = (int)ceil(support) * 2 + 1;
    double *k = malloc((size_t)ksize * sizeof(double));
    int32_t *kk = malloc((size_t)out_size * ksize * sizeof(int32_t));
    int *bounds = malloc((size_t)out_size * 2 * sizeof(int));
    if (!k || !kk || !bounds) {
        free(k), free(kk), free(bounds);
        return 0;
    }
    for (int xx = 0; xx < out_size; xx++) {
        const double center = in0 + (xx + 0.5) * scale;
        const double ss = 1.0 / filterscale;
        double ww = 0.0;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            const double w = bicubic_filter((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (int x = 0; x < ksize; x++) {
            double v = 0.0;
            if (x < xmax) v = ww != 0.0 ? k[x] / ww : k[x];
            kk[(size_t)xx * ksize + x] = v < 0 ? (int)(-0.5 + v * (1 << PRECISION_BITS))
                                               : (int)(0.5 + v * (1 << PRECISION_BITS));
        }
        bounds[xx * 2] = xmin;
        bounds[xx * 2 + 1] = xmax;
    }
    free(k);
    *boundsp = bounds;
    *kkp = kk;
    return ksize;
}

static inline uint8_t clip8(int32_t acc) {
    const int32_t v = acc >> PRECISION_BITS;
    return v < 0 ? 0 : v > 255 ? 255 : (uint8_t)v;
}

/* out line j = clip8(sum over taps m of in line (bounds[2j] + m) * kk[j][m]), lines of n bytes; acc: n sums. */
static void filter_lines_c(uint8_t *restrict out, size_t out_stride, const uint8_t *restrict in, size_t in_stride,
                           size_t n, int count, const int *bounds, const int32_t *kk, int ksize, int32_t *restrict acc) {
    for (int j = 0; j < count; j++) {
        const int32_t *k = kk + (size_t)j * ksize;
        const uint8_t *line = in + (size_t)bounds[2 * j] * in_stride;
        for (size_t i = 0; i < n; i++) acc[i] = 1 << (PRECISION_BITS - 1);
        for (int m = 0; m < bounds[2 * j + 1]; m++, line += in_stride) {
            const int32_t c = k[m];
            for (size_t i = 0; i < n; i++) acc[i] += line[i] * c;
        }
        uint8_t *o = out + (size_t)j * out_stride;
        for (size_t i = 0; i < n; i++) o[i] = clip8(acc[i]);
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

/* The same with AVX2, 32 bytes of a line at a time with their sums in registers over all taps (the C loop above
 * keeps them in memory: a load and a store per tap). Integer sums, so the order of the additions is immaterial. */
__attribute__((target("avx2"))) static void filter_lines_avx2(uint8_t *restrict out, size_t out_stride,
                                                              const uint8_t *restrict in, size_t in_stride, size_t n,
                                                              int count, const int *bounds, const int32_t *kk,
                                                              int ksize) {
    const __m256i half = _mm256_set1_epi32(1 << (PRECISION_BITS - 1));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleaving
    for (int j = 0; j < count; j++) {
        const int32_t *k = kk + (size_t)j * ksize;
        const uint8_t *first = in + (size_t)bounds[2 * j] * in_stride;
        const int taps = bounds[2 * j + 1];
        uint8_t *o = out + (size_t)j * out_stride;
        size_t i = 0;
        for (; i + 32 <= n; i += 32) {
            __m256i a0 = half, a1 = half, a2 = half, a3 = half;
            const uint8_t *p = first + i;
            for (int m = 0; m < taps; m++, p += in_stride) {
                const __m256i c = _mm256_set1_epi32(k[m]);
#define TAP(a, off) a = _mm256_add_epi32(a, _mm256_mullo_epi32(c, \
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + (off))))))
                TAP(a0, 0);
                TAP(a1, 8);
                TAP(a2, 16);
                TAP(a3, 24);
#undef TAP
            }
            const __m256i s01 = _mm256_packs_epi32(_mm256_srai_epi32(a0, PRECISION_BITS),
                                                   _mm256_srai_epi32(a1, PRECISION_BITS));
            const __m256i s23 = _mm256_packs_epi32(_mm256_srai_epi32(a2, PRECISION_BITS),
                                                   _mm256_srai_epi32(a3, PRECISION_BITS));
            _mm256_storeu_si256((__m256i *)(o + i), _mm256_permutevar8x32_epi32(_mm256_packus_epi16(s01, s23), order));
        }
        for (; i < n; i++) {
            int32_t acc = 1 << (PRECISION_BITS - 1);
            const uint8_t *p = first + i;
            for (int m = 0; m < taps; m++, p += in_stride) acc += *p * k[m];
            o[i] = clip8(acc);
        }
    }
}
#endif

static void filter_lines(uint8_t *restrict out, size_t out_stride, const uint8_t *restrict in, size_t in_stride,
                         size_t n, int count, const int *bounds, const int32_t *kk, int ksize, int32_t *restrict acc,
                         int avx2) {
#ifdef HAVE_AVX2_PATH
    if (avx2 && __builtin_cpu_supports("avx2")) {
        filter_lines_avx2(out, out_stride, in, in_stride, n, count, bounds, kk, ksize);
        return;
    }
#endif
    filter_lines_c(out, out_stride, in, in_stride, n, count, bounds, kk, ksize, acc);
}

/* 3-byte pixel copies as 4-byte moves: the extra byte read is the next pixel's (or the next line's), the extra
 * byte written is overwritten by a later copy. The last pixel of each destination line is copied as 3 bytes, so
 * no move reads past the end of the source or writes past the end of the destination. */
static inline void px4(uint8_t *d, const uint8_t *s) {
    uint32_t v;
    memcpy(&v, s, 4);
    memcpy(d, &v, 4);
}

/* dst (cols, rows, 3) = src (rows, cols, 3) transposed; src lines are src_stride bytes apart. */
static void transpose(uint8_t *restrict dst, const uint8_t *restrict src, size_t src_stride, int rows, int cols) {
    for (int x = 0; x < cols; x++) {
        uint8_t *d = dst + (size_t)x * rows * 3;
        const uint8_t *s = src + (size_t)x * 3;
        for (int r = 0; r < rows - 1; r++, d += 3, s += src_stride) px4(d, s);
        d[0] = s[0], d[1] = s[1], d[2] = s[2];
    }
}

/* dst (cols, rows, 3) with lines dst_stride bytes apart = src (rows, cols, 3) transposed. */
static void transpose_into(uint8_t *restrict dst, size_t dst_stride, const uint8_t *restrict src, int rows,
                           int cols) {
    for (int x = 0; x < cols; x++) {
        uint8_t *d = dst + (size_t)x * dst_stride;
        const uint8_t *s = src + (size_t)x * 3;
        for (int r = 0; r < rows - 1; r++, d += 3, s += (size_t)cols * 3) px4(d, s);
        d[0] = s[0], d[1] = s[1], d[2] = s[2];
    }
}

/* Per-thread scratch buffers, kept between calls: fresh multi-megabyte allocations come from mmap, and their page
 * faults cost as much as the filtering. Buffers above KEEP_BYTES are released after each call. */
enum { TMP, COLS, COLS_OUT, ACC, SLOTS };
#define KEEP_BYTES (64u << 20)
static _Thread_local struct {
    void *p;
    size_t size;
} scratch_slots[SLOTS];

static void *scratch(int slot, size_t bytes) {
    if (scratch_slots[slot].size < bytes) {
        free(scratch_slots[slot].p);
        scratch_slots[slot].p = malloc(bytes);
        scratch_slots[slot].size = scratch_slots[slot].p ? bytes : 0;
    }
    return scratch_slots[slot].p;
}

static void scratch_trim(void) {
    for (int i = 0; i < SLOTS; i++) {
        if (scratch_slots[i].size > KEEP_BYTES) {
            free(scratch_slots[i].p);
            scratch_slots[i].p = NULL, scratch_slots[i].size = 0;
        }
    }
}

/* out (rows, ow, 3) = the horizontal pass over lines [first, first + rows) of in (.., w, 3), run as a vertical
 * pass over transposed strips of STRIP lines (small enough to stay in cache). Shifts bounds. Returns 0, or -1
 * when out of memory. */
#define STRIP 64
static int horizontal(uint8_t *out, const uint8_t *in, int w, int first, int rows, int ow, int *bounds,
                      const int32_t *kk, int ksize, int avx2) {
    const int left = bounds[0], width = bounds[2 * ow - 2] + bounds[2 * ow - 1] - left;  // input columns read
    for (int i = 0; i < ow; i++) bounds[2 * i] -= left;
    uint8_t *cols = scratch(COLS, (size_t)width * STRIP * 3), *cols_out = scratch(COLS_OUT, (size_t)ow * STRIP * 3);
    int32_t *acc = scratch(ACC, STRIP * 3 * sizeof(int32_t));
    if (!cols || !cols_out || !acc) return -1;
    for (int y0 = 0; y0 < rows; y0 += STRIP) {
        const int ny = rows - y0 < STRIP ? rows - y0 : STRIP;
        const size_t n = (size_t)ny * 3;
        transpose(cols, in + ((size_t)(first + y0) * w + left) * 3, (size_t)w * 3, ny, width);
        filter_lines(cols_out, n, cols, n, n, ow, bounds, kk, ksize, acc, avx2);
        transpose_into(out + (size_t)y0 * ow * 3, (size_t)ow * 3, cols_out, ow, ny);
    }
    return 0;
}

/* out (oh, w, 3) = the vertical pass over in (.., w, 3). Returns 0, or -1 when out of memory. */
static int vertical(uint8_t *out, const uint8_t *in, int w, int oh, const int *bounds, const int32_t *kk,
                    int ksize, int avx2) {
    int32_t *acc = scratch(ACC, (size_t)w * 3 * sizeof(int32_t));
    if (!acc) return -1;
    filter_lines(out, (size_t)w * 3, in, (size_t)w * 3, (size_t)w * 3, oh, bounds, kk, ksize, acc, avx2);
    return 0;
}

/* Pillow 13's ImagingResampleInner: which passes run, in which order, over which lines. Returns 0, or -1 when
 * out of memory. */
static int resample(const uint8_t *src, int w, int h, const float box[4], uint8_t *dst, int ow, int oh, int avx2) {
    int *bv = NULL, *bh = NULL;
    int32_t *kv = NULL, *kh = NULL;
    int kv_size = 0, kh_size = 0, status = -1;
    uint8_t *tmp = NULL;
    const int need_h = ow != w || box[0] != 0 || box[2] != ow;
    const int need_v = oh != h || box[1] != 0 || box[3] != oh;
    // Pillow >= 13: vertical pass first when the height loses more than twice as many pixels as the width.
    const int horizontal_first = !((h - oh) > 0 && (h - oh) > (w - ow) * 2);
    if ((need_h && horizontal_first) || need_v) {
        if (!(kv_size = coeffs(h, box[1], box[3], oh, &bv, &kv))) goto done;
    }
    if (need_h && !(kh_size = coeffs(w, box[0], box[2], ow, &bh, &kh))) goto done;
    if (!need_h && !need_v) {
        memcpy(dst, src, (size_t)oh * ow * 3);
        status = 0;
    } else if (!need_h) {
        status = vertical(dst, src, w, oh, bv, kv, kv_size, avx2);
    } else if (horizontal_first) {
        const int first = bv[0], rows = bv[2 * oh - 2] + bv[2 * oh - 1] - first;  // input lines read
        for (int i = 0; i < oh; i++) bv[2 * i] -= first;
        if (!need_v) {
            status = horizontal(dst, src, w, first, rows, ow, bh, kh, kh_size, avx2);
        } else if ((tmp = scratch(TMP, (size_t)rows * ow * 3))) {
            status = horizontal(tmp, src, w, first, rows, ow, bh, kh, kh_size, avx2);
            if (!status) status = vertical(dst, tmp, ow, oh, bv, kv, kv_size, avx2);
        }
    } else if ((tmp = scratch(TMP, (size_t)oh * w * 3))) {  // vertical first (need_v holds: h > oh)
        status = vertical(tmp, src, w, oh, bv, kv, kv_size, avx2);
        if (!status) status = horizontal(dst, tmp, w, 0, oh, ow, bh, kh, kh_size, avx2);
    }
done:
    free(bv), free(kv), free(bh), free(kh);
    scratch_trim();
    return status;
}

PyObject *px_resize(PyObject *self, PyObject *args) {  // module.c lists it
    Py_buffer src, dst;
    int w, h, ow, oh;
    float box[4];
    int avx2 = 1;
    if (!PyArg_ParseTuple(args, "y*ii(ffff)w*ii|p", &src, &w, &h, &box[0], &box[1], &box[2], &box[3], &dst, &ow,
                          &oh, &avx2))
        return NULL;
    PyObject *result = NULL;
    if (w <= 0 || h <= 0 || ow <= 0 || oh <= 0 || src.len != (Py_ssize_t)w * h * 3 ||
        dst.len != (Py_ssize_t)ow * oh * 3) {
        PyErr_Format(PyExc_ValueError, "bicubic resize: need a %d x %d x 3 source and a %d x %d x 3 destination, "
                     "got %zd and %zd bytes", h, w, oh, ow, src.len, dst.len);
    } else if (!(box[0] >= 0 && box[1] >= 0 && box[2] <= w && box[3] <= h && box[0] <= box[2] && box[1] <= box[3])) {
        PyErr_Format(PyExc_ValueError, "bicubic resize: box (%f, %f, %f, %f) is not inside the %d x %d image",
                     box[0], box[1], box[2], box[3], w, h);
    } else {
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = resample(src.buf, w, h, box, dst.buf, ow, oh, avx2);
        Py_END_ALLOW_THREADS
        if (status) PyErr_NoMemory();
        else result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}
