/* Compiled F32 -> BF16 conversion for casting builds (checkpoint/cast.py).
 *
 * numpy needs five passes over the data for torch's round-to-nearest-even and
 * converts ~1.5 G elements/s on one core; this loop vectorizes to one pass
 * (4 G elements/s with SSE2, over 10 with AVX-512 on the same core), which is
 * what lets an fp32 -> bf16 build run near the speed of a copy. The same pass
 * notes whether any output is NaN or infinite (a non-finite input, or a finite
 * one that rounds past bfloat16's largest value), so refusing non-finite
 * weights costs no second pass. The extension is optional: where it cannot be
 * built, cast.py converts and checks with numpy and gives the same bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors bytes are little-endian; this loop reads them as native words"
#endif

/* One binary for every x86-64 CPU: the loader picks the widest vector clone
 * the CPU runs (GCC's function multi-versioning, resolved once through ifunc). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

/* torch's CPU cast: round to nearest even, and every NaN becomes 0xFFFF. memcpy
 * loads and stores keep unaligned buffers defined; compilers turn them into
 * plain vector moves. Returns 1 when some output is NaN or infinite, else 0:
 * exactly the inputs of magnitude 0x7F7F8000 and up (NaN, infinity, and the
 * finite values that round past bfloat16's largest, 0x7F7F), so a max
 * reduction beside the conversion finds them (it vectorizes with the loop and
 * costs nothing measurable; a compare on each output halved the speed). */
VECTOR_CLONES static int
f32_to_bf16_loop(const unsigned char *restrict in, unsigned char *restrict out, size_t count)
{
    uint32_t largest = 0;
    for (size_t i = 0; i < count; i++) {
        uint32_t bits;
        memcpy(&bits, in + 4 * i, 4);
        uint32_t magnitude = bits & 0x7FFFFFFFu;
        uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        uint16_t value = magnitude > 0x7F800000u ? 0xFFFFu : rounded;
        memcpy(out + 2 * i, &value, 2);
        largest = largest > magnitude ? largest : magnitude;
    }
    return largest >= 0x7F7F8000u;
}

static PyObject *
f32_to_bf16_checked(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "f32_to_bf16_checked(source, output) takes two buffers");
        return NULL;
    }
    Py_buffer source, output;
    if (PyObject_GetBuffer(args[0], &source, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &output, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&source);
        return NULL;
    }
    Py_ssize_t count = source.len / 4;
    PyObject *result = NULL;
    if (source.len % 4 != 0)
        PyErr_Format(PyExc_ValueError, "source holds %zd bytes, not a whole number of float32s", source.len);
    else if (output.len < 2 * count)
        PyErr_Format(PyExc_ValueError, "output holds %zd bytes; %zd float32s need %zd", output.len, count, 2 * count);
    else {
        int special;
        Py_BEGIN_ALLOW_THREADS
        special = f32_to_bf16_loop(source.buf, output.buf, (size_t)count);
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("(nO)", 2 * count, special ? Py_False : Py_True);
    }
    PyBuffer_Release(&output);
    PyBuffer_Release(&source);
    return result;
}

static PyMethodDef methods[] = {
    {"f32_to_bf16_checked", (PyCFunction)(void (*)(void))f32_to_bf16_checked, METH_FASTCALL,
     "f32_to_bf16_checked(source, output) -> (int, bool)\n\n"
     "Convert the little-endian float32s in `source` to bfloat16 in `output`, as torch's "
     "CPU cast does; returns the number of bytes written and whether every output is finite. "
     "Releases the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "layersplice.checkpoint._fastcast",
    "Compiled F32 -> BF16 conversion (optional; cast.py falls back to numpy).", -1, methods,
};

PyMODINIT_FUNC
PyInit__fastcast(void)
{
    return PyModule_Create(&module);
}
