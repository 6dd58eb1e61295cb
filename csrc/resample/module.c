/* The loader's pixel loops as one Python module, ofa_ds.data._pixel_ops: each function lives in its own file of
 * csrc/resample and is documented there. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

PyObject *px_resize(PyObject *self, PyObject *args);   // bicubic.c
PyObject *px_affine(PyObject *self, PyObject *args);   // affine.c
PyObject *px_sharpen(PyObject *self, PyObject *args);  // sharpen.c
PyObject *px_planar(PyObject *self, PyObject *args);   // planar.c

static PyMethodDef methods[] = {
    {"resize", px_resize, METH_VARARGS, "Pillow's bicubic Image.resize(size, box=box) of a uint8 RGB buffer."},
    {"affine", px_affine, METH_VARARGS, "Pillow's bilinear Image.transform(size, AFFINE, a, fillcolor=fill) of RGB."},
    {"sharpen", px_sharpen, METH_VARARGS, "Pillow's Image.blend(img.filter(SMOOTH), img, alpha) of RGB pixels."},
    {"planar", px_planar, METH_VARARGS, "(h, w, 3 or 4) uint8 pixels -> (3, h, w) planes, into dst."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pixel_ops", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pixel_ops(void) { return PyModule_Create(&module); }
