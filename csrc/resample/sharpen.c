/* RandAugment's sharpness of an 8-bit RGB image, bit for bit as Pillow computes
 * Image.blend(img.filter(ImageFilter.SMOOTH), img, alpha):
 * - SMOOTH (libImaging/Filter.c, ImagingFilter3x3): kernel (1 1 1; 1 5 1; 1 1 1) / 13 in float32, rows summed
 *   below, centre, above, each as ((a k0 + b k1) + c k2), from 0.5, clamped to [0, 255] and truncated; the
 *   border pixels copied;
 * - blend (libImaging/Blend.c, extrapolation): smooth + alpha * (img - smooth) in float32, clamped and truncated.
 * Every byte of a line is one channel of one pixel whose neighbours lie bpp bytes away, so a line is filtered 8
 * bytes at a time with AVX2 (scalar elsewhere); Pillow's loops are scalar, about 5 ms for 384 x 384.
 * Build with -ffp-contract=off: a fused multiply-add rounds differently.
 *
 * Python: sharpen(src, w, h, bpp, dst, alpha) with src a C-contiguous uint8 (h, w, bpp) buffer, bpp 3 or 4
 * (Pillow's RGBX memory; the X bytes are filtered too and mean nothing), dst a writable one of the same size.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

// Pillow's order: kernel[0..2] multiply the line below, [3..5] this one, [6..8] the one above. Each weight is
// a float32 quotient, as _imaging.c's kerneldata[i] /= divisor gives it (the compiler rounds the same).
static const float kernel[9] = {1.0f / 13, 1.0f / 13, 1.0f / 13, 1.0f / 13, 5.0f / 13, 1.0f / 13, 1.0f / 13, 1.0f / 13,
                                1.0f / 13};

static inline float row3(const uint8_t *p, int d, const float *k) {
    return (float)p[-d] * k[0] + (float)p[0] * k[1] + (float)p[d] * k[2];
}

static inline uint8_t clip8(float v) {
    v = v < 0.0f ? 0.0f : v;
    v = v > 255.0f ? 255.0f : v;
    return (uint8_t)v;
}

static inline uint8_t sharp(const uint8_t *below, const uint8_t *at, const uint8_t *above, int d, float alpha) {
    float ss = 0.5f;
    ss += row3(below, d, &kernel[0]);
    ss += row3(at, d, &kernel[3]);
    ss += row3(above, d, &kernel[6]);
    const int smooth = clip8(ss);
    return clip8((float)(smooth + alpha * (at[0] - smooth)));
}

static void line_scalar(uint8_t *out, const uint8_t *below, const uint8_t *at, const uint8_t *above, size_t from,
                        size_t to, int d, float alpha) {
    for (size_t i = from; i < to; i++) out[i] = sharp(below + i, at + i, above + i, d, alpha);
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

__attribute__((target("avx2"))) static inline __m256 bytes8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

__attribute__((target("avx2"))) static inline __m256 row3_avx2(const uint8_t *p, int d, const float *k) {
    const __m256 ab = _mm256_add_ps(_mm256_mul_ps(bytes8(p - d), _mm256_set1_ps(k[0])),
                                    _mm256_mul_ps(bytes8(p), _mm256_set1_ps(k[1])));
    return _mm256_add_ps(ab, _mm256_mul_ps(bytes8(p + d), _mm256_set1_ps(k[2])));
}

__attribute__((target("avx2"))) static inline __m256i clip8_avx2(__m256 v) {  // 8 int32 in [0, 255]
    return _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(255.0f)));
}

__attribute__((target("avx2"))) static size_t line_avx2(uint8_t *out, const uint8_t *below, const uint8_t *at,
                                                        const uint8_t *above, size_t from, size_t to, int d,
                                                        float alpha) {
    const __m256 a = _mm256_set1_ps(alpha);
    size_t i = from;
    for (; i + 8 <= to; i += 8) {  // loads reach i + 7 + d < to + d = the line's end
        __m256 ss = _mm256_set1_ps(0.5f);
        ss = _mm256_add_ps(ss, row3_avx2(below + i, d, &kernel[0]));
        ss = _mm256_add_ps(ss, row3_avx2(at + i, d, &kernel[3]));
        ss = _mm256_add_ps(ss, row3_avx2(above + i, d, &kernel[6]));
        const __m256i smooth = clip8_avx2(ss);
        const __m256i src = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(at + i)));
        const __m256 diff = _mm256_cvtepi32_ps(_mm256_sub_epi32(src, smooth));
        const __m256i v = clip8_avx2(_mm256_add_ps(_mm256_cvtepi32_ps(smooth), _mm256_mul_ps(a, diff)));
        const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64((__m128i *)(out + i), _mm_packus_epi16(w16, w16));
    }
    return i;
}
#endif

PyObject *px_sharpen(PyObject *self, PyObject *args) {  // module.c lists it
    Py_buffer src, dst;
    int w, h, bpp, avx2 = 1;
    float alpha;
    if (!PyArg_ParseTuple(args, "y*iiiw*f|p", &src, &w, &h, &bpp, &dst, &alpha, &avx2)) return NULL;
    PyObject *result = NULL;
    const size_t line = (size_t)w * bpp;
    if (w <= 0 || h <= 0 || (bpp != 3 && bpp != 4) || src.len != (Py_ssize_t)(line * h) || dst.len != src.len) {
        PyErr_Format(PyExc_ValueError, "sharpen: need a %d x %d x 3 or 4 source and a destination of its size, got "
                     "%zd and %zd bytes (%d bytes per pixel)", h, w, src.len, dst.len, bpp);
    } else {
        const uint8_t *in = src.buf;
        uint8_t *out = dst.buf;
        Py_BEGIN_ALLOW_THREADS
        memcpy(out, in, line);  // border lines and pixels: Pillow copies them, and blend(x, x) is x
        if (h > 1) memcpy(out + (h - 1) * line, in + (h - 1) * line, line);
        for (int y = 1; y < h - 1; y++) {
            const uint8_t *above = in + (y - 1) * line, *at = in + y * line, *below = in + (y + 1) * line;
            uint8_t *o = out + y * line;
            memcpy(o, at, bpp);
            memcpy(o + line - bpp, at + line - bpp, bpp);
            if (w < 3) continue;
            size_t i = bpp;  // interior bytes: [bpp, line - bpp)
#ifdef HAVE_AVX2_PATH
            if (avx2 && __builtin_cpu_supports("avx2")) i = line_avx2(o, below, at, above, i, line - bpp, bpp, alpha);
#endif
            line_scalar(o, below, at, above, i, line - bpp, bpp, alpha);
        }
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}
