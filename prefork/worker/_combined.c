/* prefork.worker._combined: the combined access line, formatted in C.

Owns: nothing but the formatting. logship.combined_line() is the definition
of the line; this is the same line, made without the interpreter (the f-string
cost about an eighth of a small request's work), and a test holds the two
equal. Must not: decide what is logged or where it goes (logship does).

combined_line(environ, stamp, status, sent, duration) -> str, or None where
the Python definition must do it: an environ value that is not a str with
one-byte characters (an app may have put anything there), or a line too long
for the buffer here.

combined_into(batch, environ, stamp, status, sent, duration) -> bool: the same
line written straight into a shared batch (ipc.SharedBatch: a writable
buffer, its used bytes a native uint64 at offset 0, its text from offset
SHARED_HEADER), which it then counts as used; False, with nothing written,
where the Python definition must do it or the batch has no room left.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define LINE_BUFFER 8192
#define SHARED_HEADER 16   /* ipc.SharedBatch.HEADER: used bytes, lines shipped before */

static PyObject *k_remote, *k_method, *k_uri, *k_protocol, *k_referer, *k_agent;

/* The latin-1 bytes of environ[key] (default "-" when absent): 0, or -1 when
   the Python formatter must do the line (or an error is set). */
static int
field(PyObject *environ, PyObject *key, const Py_UCS1 **data, Py_ssize_t *len)
{
    PyObject *value = PyDict_GetItemWithError(environ, key);   /* borrowed */
    if (value == NULL) {
        if (PyErr_Occurred())
            return -1;
        *data = (const Py_UCS1 *)"-";
        *len = 1;
        return 0;
    }
    if (!PyUnicode_Check(value) || PyUnicode_KIND(value) != PyUnicode_1BYTE_KIND)
        return -1;
    *data = PyUnicode_1BYTE_DATA(value);
    *len = PyUnicode_GET_LENGTH(value);
    return 0;
}

typedef struct {
    char *at, *end;
} Out;

static int
put(Out *o, const void *data, Py_ssize_t len)
{
    if (o->end - o->at < len)
        return -1;
    memcpy(o->at, data, len);
    o->at += len;
    return 0;
}

/* As logship's _quote: backslash and double quote escaped with a backslash. */
static int
put_quoted(Out *o, const Py_UCS1 *data, Py_ssize_t len)
{
    for (Py_ssize_t i = 0; i < len; i++) {
        if (o->end - o->at < 2)
            return -1;
        if (data[i] == '"' || data[i] == '\\')
            *o->at++ = '\\';
        *o->at++ = (char)data[i];
    }
    return 0;
}

static int
put_int(Out *o, long long value)
{
    char digits[24];
    int n = 0;
    unsigned long long v = value < 0 ? -(unsigned long long)value : (unsigned long long)value;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (value < 0)
        digits[n++] = '-';
    if (o->end - o->at < n)
        return -1;
    while (n)
        *o->at++ = digits[--n];
    return 0;
}

/* The line into o: 1 written, 0 where the Python definition must do it (o
   may hold part of a line then), -1 with an error set. */
static int
format_line(Out *o, PyObject *const *args)
{
    PyObject *environ = args[0], *stamp = args[1];
    if (!PyDict_Check(environ) || !PyUnicode_Check(stamp)
            || PyUnicode_KIND(stamp) != PyUnicode_1BYTE_KIND)
        return 0;
    long long status = PyLong_AsLongLong(args[2]);
    long long sent = PyLong_AsLongLong(args[3]);
    double duration = PyFloat_AsDouble(args[4]);
    if (PyErr_Occurred()) {   /* not ints and a float, or too large: Python formats anything */
        PyErr_Clear();
        return 0;
    }
    if (!(duration * 1e6 < 1e18 && duration * 1e6 > -1e18))
        return 0;   /* no long long holds it (or NaN): Python's int() does */
    const Py_UCS1 *remote, *method, *uri, *protocol, *referer, *agent;
    Py_ssize_t remote_len, method_len, uri_len, protocol_len, referer_len, agent_len;
    if (field(environ, k_remote, &remote, &remote_len) < 0
            || field(environ, k_method, &method, &method_len) < 0
            || field(environ, k_uri, &uri, &uri_len) < 0
            || field(environ, k_protocol, &protocol, &protocol_len) < 0
            || field(environ, k_referer, &referer, &referer_len) < 0
            || field(environ, k_agent, &agent, &agent_len) < 0)
        return PyErr_Occurred() ? -1 : 0;
    if (remote_len == 0) {
        remote = (const Py_UCS1 *)"-";
        remote_len = 1;
    }
    if (put(o, remote, remote_len) < 0 || put(o, " - - ", 5) < 0
            || put(o, PyUnicode_1BYTE_DATA(stamp), PyUnicode_GET_LENGTH(stamp)) < 0
            || put(o, " \"", 2) < 0 || put(o, method, method_len) < 0 || put(o, " ", 1) < 0
            || put_quoted(o, uri, uri_len) < 0 || put(o, " ", 1) < 0
            || put(o, protocol, protocol_len) < 0 || put(o, "\" ", 2) < 0
            || put_int(o, status) < 0 || put(o, " ", 1) < 0 || put_int(o, sent) < 0
            || put(o, " \"", 2) < 0 || put_quoted(o, referer, referer_len) < 0
            || put(o, "\" \"", 3) < 0 || put_quoted(o, agent, agent_len) < 0
            || put(o, "\" ", 2) < 0 || put_int(o, (long long)(duration * 1e6)) < 0
            || put(o, "\n", 1) < 0)
        return 0;   /* no room: the Python formatter has no limit */
    return 1;
}

static PyObject *
combined_line(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "combined_line(environ, stamp, status, sent, duration)");
        return NULL;
    }
    char buffer[LINE_BUFFER];
    Out o = {buffer, buffer + LINE_BUFFER};
    int done = format_line(&o, args);
    if (done < 0)
        return NULL;
    if (done == 0)
        Py_RETURN_NONE;
    return PyUnicode_DecodeLatin1(buffer, o.at - buffer, NULL);
}

static PyObject *
combined_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "combined_into(batch, environ, stamp, status, sent, duration)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    char *base = view.buf;
    uint64_t used;
    if (view.len < SHARED_HEADER) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "not a shared batch");
        return NULL;
    }
    memcpy(&used, base, sizeof used);
    int done = 0;
    if (used <= (uint64_t)(view.len - SHARED_HEADER)) {
        Out o = {base + SHARED_HEADER + used, base + view.len};
        done = format_line(&o, args + 1);
        if (done == 1) {
            used = (uint64_t)(o.at - base - SHARED_HEADER);
            memcpy(base, &used, sizeof used);   /* only a whole line is counted */
        }
    }
    PyBuffer_Release(&view);
    if (done < 0)
        return NULL;
    return PyBool_FromLong(done);
}

static PyMethodDef methods[] = {
    {"combined_line", (PyCFunction)(void (*)(void))combined_line, METH_FASTCALL,
     "combined_line(environ, stamp, status, sent, duration) -> str, or None (see the module)."},
    {"combined_into", (PyCFunction)(void (*)(void))combined_into, METH_FASTCALL,
     "combined_into(batch, environ, stamp, status, sent, duration) -> bool (see the module)."},
    {NULL}
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "prefork.worker._combined",
    .m_doc = "The combined access line, formatted in C (see logship.combined_line).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__combined(void)
{
    k_remote = PyUnicode_InternFromString("REMOTE_ADDR");
    k_method = PyUnicode_InternFromString("REQUEST_METHOD");
    k_uri = PyUnicode_InternFromString("RAW_URI");
    k_protocol = PyUnicode_InternFromString("SERVER_PROTOCOL");
    k_referer = PyUnicode_InternFromString("HTTP_REFERER");
    k_agent = PyUnicode_InternFromString("HTTP_USER_AGENT");
    if (!k_remote || !k_method || !k_uri || !k_protocol || !k_referer || !k_agent)
        return NULL;
    return PyModule_Create(&module);
}
