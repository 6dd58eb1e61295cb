/* Lossless progressive -> baseline JPEG transcoding (what `jpegtran` does without options), for tsv2arrow.
 *
 * A progressive JPEG spreads every block's DCT coefficients over several scans, and decoding one costs 3-4x a
 * baseline JPEG of the same image (libjpeg-turbo: the coefficient buffer of the whole image, several entropy
 * passes). The coefficients are copied, not recomputed, so the transcoded file decodes to the same pixels; the
 * caller still checks that. Saved APPn and COM markers are copied (JFIF/Adobe headers are written by libjpeg).
 *
 * Python: baseline(data) -> bytes, or None when data is not a progressive YCbCr or grayscale JPEG, or when libjpeg
 * reports an error or a warning (corrupt data) on the way.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

struct error {
    struct jpeg_error_mgr mgr;
    jmp_buf jump;
};

static void on_error(j_common_ptr cinfo) { longjmp(((struct error *)cinfo->err)->jump, 1); }

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) longjmp(((struct error *)cinfo->err)->jump, 1);  // a warning: corrupt data
}

static int is_marker(jpeg_saved_marker_ptr m, int marker, const char *id) {
    const size_t n = strlen(id) + 1;
    return m->marker == marker && m->data_length >= n && !memcmp(m->data, id, n);
}

/* 1 and *out (malloc'ed, *out_size bytes) on success, 0 otherwise. */
static int transcode(const unsigned char *data, size_t size, unsigned char **out, unsigned long *out_size) {
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    struct error err;
    volatile int have_dst = 0;
    src.err = dst.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = on_error;
    err.mgr.emit_message = on_message;
    jpeg_create_decompress(&src);
    if (setjmp(err.jump)) {
        if (have_dst) jpeg_destroy_compress(&dst);
        jpeg_destroy_decompress(&src);
        free(*out);
        *out = NULL;
        return 0;
    }
    jpeg_mem_src(&src, data, size);
    for (int i = 0; i < 16; i++) jpeg_save_markers(&src, JPEG_APP0 + i, 0xFFFF);
    jpeg_save_markers(&src, JPEG_COM, 0xFFFF);
    jpeg_read_header(&src, TRUE);
    if (!src.progressive_mode || (src.jpeg_color_space != JCS_YCbCr && src.jpeg_color_space != JCS_GRAYSCALE)) {
        jpeg_destroy_decompress(&src);
        return 0;
    }
    jvirt_barray_ptr *coefficients = jpeg_read_coefficients(&src);
    jpeg_create_compress(&dst);
    have_dst = 1;
    jpeg_copy_critical_parameters(&src, &dst);
    dst.optimize_coding = TRUE;  // Huffman tables fitted to the image: about the progressive file's size
    jpeg_mem_dest(&dst, out, out_size);
    jpeg_write_coefficients(&dst, coefficients);
    for (jpeg_saved_marker_ptr m = src.marker_list; m; m = m->next) {
        if ((dst.write_JFIF_header && is_marker(m, JPEG_APP0, "JFIF")) ||
            (dst.write_Adobe_marker && is_marker(m, JPEG_APP0 + 14, "Adobe")))
            continue;  // written by libjpeg already
        jpeg_write_marker(&dst, m->marker, m->data, m->data_length);
    }
    jpeg_finish_compress(&dst);
    jpeg_destroy_compress(&dst);
    have_dst = 0;
    jpeg_finish_decompress(&src);
    jpeg_destroy_decompress(&src);
    return 1;
}

static PyObject *baseline(PyObject *self, PyObject *arg) {
    Py_buffer in;
    if (!PyArg_Parse(arg, "y*", &in)) return NULL;
    unsigned char *out = NULL;
    unsigned long out_size = 0;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = transcode(in.buf, (size_t)in.len, &out, &out_size);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&in);
    PyObject *result = ok ? PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)out_size) : Py_NewRef(Py_None);
    free(out);
    return result;
}

static PyMethodDef methods[] = {
    {"baseline", baseline, METH_O, "A progressive JPEG losslessly transcoded to baseline, else None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegtran", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpegtran(void) { return PyModule_Create(&module); }
