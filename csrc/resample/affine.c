/* Pillow's bilinear affine transform of an 8-bit RGB image, bit for bit:
 * Image.transform(size, AFFINE, a, BILINEAR, fillcolor=fill) of an image of the same size.
 *
 * Pillow runs it through ImagingGenericTransform: per output pixel a call through a function pointer for the
 * coordinates and another for the sample (libImaging/Geometry.c, affine_transform + bilinear_filter32RGB), about
 * 5 ms for a 384 x 384 image. This computes the same double-precision expressions in the same order, four pixels
 * at a time with AVX2 (coordinates, floor, clamps, the 4 source pixels by gathers, the three-step interpolation,
 * the truncation to uint8), and one pixel at a time elsewhere. Build with -ffp-contract=off: a fused multiply-add
 * rounds differently from Pillow's separate multiply and add.
 *
 * Python: affine(src, w, h, bpp, (a0, ..., a5), dst, (r, g, b)[, avx2=True]) with src a C-contiguous uint8
 * (h, w, bpp) buffer, bpp 3 (RGB) or 4 (Pillow's RGBX memory), and dst a writable uint8 (h, w, 3) one. Every
 * destination pixel is written: the fill colour where the source position falls outside the image.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const uint8_t *px;
    int w, h, bpp;
    double a[6];
    uint8_t fill[3];
} Warp;

static inline int clampi(int v, int hi) { return v < 0 ? 0 : v > hi ? hi : v; }

/* Pillow's affine_transform, then bilinear_filter32RGB (BILINEAR_HEAD/BODY) with its XCLIP/YCLIP and its
 * "v2 = v1 below the last line" (the same value as sampling the clipped line twice). */
static void pixel(const Warp *t, int x, int y, uint8_t *out) {
    const double *a = t->a;
    const double xin = x + 0.5, yin = y + 0.5;
    double xx = a[0] * xin + a[1] * yin + a[2];
    double yy = a[3] * xin + a[4] * yin + a[5];
    if (xx < 0.0 || xx >= t->w || yy < 0.0 || yy >= t->h) {
        memcpy(out, t->fill, 3);
        return;
    }
    xx -= 0.5;
    yy -= 0.5;
    const int ix = xx < 0.0 ? (int)floor(xx) : (int)xx, iy = yy < 0.0 ? (int)floor(yy) : (int)yy;
    const double dx = xx - ix, dy = yy - iy;
    const size_t row = (size_t)t->w * t->bpp;
    const uint8_t *r0 = t->px + (size_t)clampi(iy, t->h - 1) * row, *r1 = t->px + (size_t)clampi(iy + 1, t->h - 1) * row;
    const int x0 = clampi(ix, t->w - 1) * t->bpp, x1 = clampi(ix + 1, t->w - 1) * t->bpp;
    for (int b = 0; b < 3; b++) {
        const double v1 = r0[x0 + b] + (r0[x1 + b] - r0[x0 + b]) * dx;
        const double v2 = r1[x0 + b] + (r1[x1 + b] - r1[x0 + b]) * dx;
        out[b] = (uint8_t)(v1 + (v2 - v1) * dy);
    }
}

static void rows_scalar(const Warp *t, uint8_t *dst) {
    for (int y = 0; y < t->h; y++)
        for (int x = 0; x < t->w; x++) pixel(t, x, y, dst + ((size_t)y * t->w + x) * 3);
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

/* Four source pixels as RGB in the low 3 bytes of each 32-bit lane. A 4-byte load of a 3-byte pixel reads one
 * byte past it: for the image's last pixel that byte is outside the buffer, so it is loaded from one byte
 * earlier and shifted down. */
__attribute__((target("avx2"))) static inline __m128i gather(const uint8_t *px, __m128i off, __m128i last) {
    const __m128i over = _mm_cmpgt_epi32(off, last);  // -1 where the load would read past the end
    const __m128i g = _mm_i32gather_epi32((const int *)px, _mm_add_epi32(off, over), 1);
    return _mm_srlv_epi32(g, _mm_and_si128(over, _mm_set1_epi32(8)));
}

__attribute__((target("avx2"))) static inline __m256d channel(__m128i g, int b) {
    return _mm256_cvtepi32_pd(_mm_and_si128(_mm_srli_epi32(g, 8 * b), _mm_set1_epi32(0xff)));
}

__attribute__((target("avx2"))) static void rows_avx2(const Warp *t, uint8_t *dst) {
    const double *a = t->a;
    const __m256d a0 = _mm256_set1_pd(a[0]), a1 = _mm256_set1_pd(a[1]), a2 = _mm256_set1_pd(a[2]);
    const __m256d a3 = _mm256_set1_pd(a[3]), a4 = _mm256_set1_pd(a[4]), a5 = _mm256_set1_pd(a[5]);
    const __m256d zero = _mm256_setzero_pd(), half = _mm256_set1_pd(0.5);
    const __m256d wd = _mm256_set1_pd(t->w), hd = _mm256_set1_pd(t->h);
    const __m128i one = _mm_set1_epi32(1), xmax = _mm_set1_epi32(t->w - 1), ymax = _mm_set1_epi32(t->h - 1);
    const __m128i izero = _mm_setzero_si128(), bpp = _mm_set1_epi32(t->bpp), row = _mm_set1_epi32(t->w * t->bpp);
    const __m128i last = _mm_set1_epi32(t->w * t->h * t->bpp - 4);
    const __m128i fill = _mm_set1_epi32(t->fill[0] | t->fill[1] << 8 | t->fill[2] << 16);
    const __m128i pack = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);  // 4 RGBX -> 12 bytes
    uint8_t *const end = dst + (size_t)t->w * t->h * 3;
    for (int y = 0; y < t->h; y++) {
        const __m256d yin = _mm256_set1_pd(y + 0.5);
        const __m256d ya = _mm256_mul_pd(a1, yin), yb = _mm256_mul_pd(a4, yin);
        uint8_t *out = dst + (size_t)y * t->w * 3;
        int x = 0;
        for (; x + 4 <= t->w; x += 4, out += 12) {
            const __m256d xin = _mm256_add_pd(_mm256_setr_pd(x, x + 1, x + 2, x + 3), half);
            __m256d xx = _mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(a0, xin), ya), a2);
            __m256d yy = _mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(a3, xin), yb), a5);
            const __m256d inside = _mm256_and_pd(
                _mm256_and_pd(_mm256_cmp_pd(xx, zero, _CMP_GE_OQ), _mm256_cmp_pd(xx, wd, _CMP_LT_OQ)),
                _mm256_and_pd(_mm256_cmp_pd(yy, zero, _CMP_GE_OQ), _mm256_cmp_pd(yy, hd, _CMP_LT_OQ)));
            const int mask = _mm256_movemask_pd(inside);
            __m128i pixels = fill;
            if (mask) {
                xx = _mm256_sub_pd(xx, half);
                yy = _mm256_sub_pd(yy, half);
                const __m256d fx = _mm256_floor_pd(xx), fy = _mm256_floor_pd(yy);
                const __m256d dx = _mm256_sub_pd(xx, fx), dy = _mm256_sub_pd(yy, fy);
                // Lanes outside the image may hold any value: clamped, their loads stay inside the buffer.
                const __m128i ix = _mm256_cvttpd_epi32(_mm256_max_pd(fx, _mm256_set1_pd(-1.0)));
                const __m128i iy = _mm256_cvttpd_epi32(_mm256_max_pd(fy, _mm256_set1_pd(-1.0)));
                const __m128i cx0 = _mm_mullo_epi32(_mm_max_epi32(_mm_min_epi32(ix, xmax), izero), bpp);
                const __m128i cx1 = _mm_mullo_epi32(_mm_max_epi32(_mm_min_epi32(_mm_add_epi32(ix, one), xmax), izero), bpp);
                const __m128i r0 = _mm_mullo_epi32(_mm_max_epi32(_mm_min_epi32(iy, ymax), izero), row);
                const __m128i r1 = _mm_mullo_epi32(_mm_max_epi32(_mm_min_epi32(_mm_add_epi32(iy, one), ymax), izero), row);
                const __m128i g00 = gather(t->px, _mm_add_epi32(r0, cx0), last);
                const __m128i g01 = gather(t->px, _mm_add_epi32(r0, cx1), last);
                const __m128i g10 = gather(t->px, _mm_add_epi32(r1, cx0), last);
                const __m128i g11 = gather(t->px, _mm_add_epi32(r1, cx1), last);
                __m128i rgb = _mm_setzero_si128();
                for (int b = 0; b < 3; b++) {
                    const __m256d p00 = channel(g00, b), p01 = channel(g01, b);
                    const __m256d p10 = channel(g10, b), p11 = channel(g11, b);
                    const __m256d v1 = _mm256_add_pd(p00, _mm256_mul_pd(_mm256_sub_pd(p01, p00), dx));
                    const __m256d v2 = _mm256_add_pd(p10, _mm256_mul_pd(_mm256_sub_pd(p11, p10), dx));
                    const __m256d v = _mm256_add_pd(v1, _mm256_mul_pd(_mm256_sub_pd(v2, v1), dy));
                    rgb = _mm_or_si128(rgb, _mm_slli_epi32(_mm256_cvttpd_epi32(v), 8 * b));
                }
                const __m128i in32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(
                    _mm256_castpd_si256(inside), _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
                pixels = _mm_blendv_epi8(fill, rgb, in32);
            }
            pixels = _mm_shuffle_epi8(pixels, pack);
            if (end - out >= 16) {
                _mm_storeu_si128((__m128i *)out, pixels);  // the 4 bytes past these pixels are written later
            } else {
                uint8_t tmp[16];
                _mm_storeu_si128((__m128i *)tmp, pixels);
                memcpy(out, tmp, 12);
            }
        }
        for (; x < t->w; x++, out += 3) pixel(t, x, y, out);
    }
}
#endif

PyObject *px_affine(PyObject *self, PyObject *args) {  // module.c lists it
    Py_buffer src, dst;
    Warp t;
    int fill[3], avx2 = 1;
    if (!PyArg_ParseTuple(args, "y*iii(dddddd)w*(iii)|p", &src, &t.w, &t.h, &t.bpp, &t.a[0], &t.a[1], &t.a[2],
                          &t.a[3], &t.a[4], &t.a[5], &dst, &fill[0], &fill[1], &fill[2], &avx2))
        return NULL;
    PyObject *result = NULL;
    if (t.w <= 0 || t.h <= 0 || (t.bpp != 3 && t.bpp != 4) || src.len != (Py_ssize_t)t.w * t.h * t.bpp ||
        dst.len != (Py_ssize_t)t.w * t.h * 3) {
        PyErr_Format(PyExc_ValueError, "bilinear affine: need a %d x %d x 3 or 4 source and a %d x %d x 3 "
                     "destination, got %zd and %zd bytes (%d bytes per pixel)", t.h, t.w, t.h, t.w, src.len, dst.len,
                     t.bpp);
    } else {
        for (int b = 0; b < 3; b++) t.fill[b] = (uint8_t)fill[b];
        t.px = src.buf;
        Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AVX2_PATH
        // 32-bit gather offsets: images up to 2 GB.
        if (avx2 && __builtin_cpu_supports("avx2") && src.len < INT32_MAX) rows_avx2(&t, dst.buf);
        else
#endif
            rows_scalar(&t, dst.buf);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}
