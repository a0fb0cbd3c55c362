/* prefork.http._llhttp: llhttp driven for RequestReader, one Python call per head.

Owns: an llhttp request parser and the bytes it has seen of the head being
read (the target and the field being read; llhttp buffers nothing; the buffers
are lent, see spare below); filing the usual header fields into the head's
environ. Must not: decide anything about
a request (limits, Host, framing, what is an error beyond llhttp's grammar):
RequestReader (request.py) does, in Python, and is the only user.

Why it exists: through httptools, llhttp calls back into Python for every
event, one call per header field among them, and each call costs about as much
as llhttp's whole parse of a small request. Here llhttp's callbacks are C: the
head's target and fields are gathered in C and handed over in one call,
protocol.on_head(method, target, version, fields, odd, size):
  method   str, e.g. "GET" (llhttp's name for it)
  target   bytes, the request-target as received
  version  str, "1.1", "1.0" or "M.m"
  fields   a copy of the template dict, holding each field whose name is a key
           of `keys` (bytes -> environ key) and not there yet, as key -> value
           (latin-1 str, trailing SP/HTAB removed; llhttp drops leading ones)
  odd      None, or a list of (name, value) bytes pairs of the fields not filed,
           in order: the first whose name is not in `keys` or whose key is
           already there, and every field after it. The reader files them
           (repeats, refused names, new names)
  size     the head's field bytes as max_header_size counts them: name +
           value + 4 (": " and CRLF) for each field, odd ones included
The other calls: on_url(target) when the target grows past max_url (the
reader refuses it), on_header(name, value) for trailer fields, on_body(bytes),
on_message_complete(keep_alive), keep_alive being llhttp's verdict. An
exception from any of them stops the parse: feed_data() raises httptools'
HttpParserCallbackError with the exception as its __context__. llhttp's own errors raise httptools' exception classes with
llhttp's reason, as httptools does, so the reader handles both bindings alike.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include "llhttp.h"

enum { IDLE, HEAD, BODY };

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int
buf_add(Buf *b, const char *at, size_t n)
{
    if (n == 0)
        return 0;   /* (an empty span: b->data may be NULL, which memcpy must not see) */
    if (b->len + (Py_ssize_t)n > b->cap) {
        Py_ssize_t cap = 2 * (b->len + (Py_ssize_t)n);
        char *data = PyMem_Realloc(b->data, cap < 128 ? 128 : cap);
        if (data == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->data = data;
        b->cap = cap < 128 ? 128 : cap;
    }
    memcpy(b->data + b->len, at, n);
    b->len += n;
    return 0;
}

/* The bytes of the target and of the field being read live in three buffers
   that a parser borrows from here when a feed begins between messages, and
   gives back when a feed ends between messages: an idle connection holds
   none. A parser whose feed ends inside a message keeps them until it is
   done (the spare is then empty, and the next parser's grow from nothing).
   One that grew past BUF_KEPT for a large head is freed, not kept as spare. */
#define BUF_KEPT 4096
enum { URL, NAME, VALUE, BUFS };
static Buf spare[BUFS];

typedef struct {
    PyObject_HEAD
    llhttp_t parser;
    /* the protocol's bound methods */
    PyObject *on_head, *on_header, *on_body, *on_message_complete, *on_url;
    PyObject *template;     /* dict: each head's fields start as a copy */
    PyObject *keys;         /* dict: field name (bytes) -> environ key (str) */
    Py_ssize_t max_url;
    PyObject *fields;       /* the head's dict, from message begin to headers complete */
    PyObject *odd;          /* list of (name, value) not filed, or NULL */
    PyObject *error;        /* what a protocol call raised, for feed_data to chain */
    Py_ssize_t size;        /* field bytes so far, counted as on_head's size */
    int state;
    Buf bufs[BUFS];         /* borrowed for a feed; kept while a message is unfinished */
} Parser;

static PyObject *method_names[64];   /* llhttp's method number -> its name ("-": none) */
static PyObject *version_11, *version_10;
static PyObject *ParserError, *CallbackError, *InvalidMethodError, *InvalidURLError, *Upgrade;
static llhttp_settings_t settings;

/* A protocol call failed (or memory ran out): keep the exception for
   feed_data(), which raises it as the callback error's __context__. */
static int
keep_error(Parser *self, const char *reason, int code)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL) {
        PyException_SetTraceback(value, tb);
        Py_DECREF(tb);
    }
    Py_XDECREF(type);
    Py_XSETREF(self->error, value);
    llhttp_set_error_reason(&self->parser, reason);
    return code;
}

static PyObject *
call1(PyObject *callable, PyObject *arg)
{
    PyObject *result = PyObject_CallOneArg(callable, arg);
    Py_DECREF(arg);
    return result;
}

static int
cb_message_begin(llhttp_t *p)
{
    Parser *self = (Parser *)p->data;
    self->state = HEAD;
    self->size = 0;
    self->bufs[URL].len = self->bufs[NAME].len = self->bufs[VALUE].len = 0;
    Py_CLEAR(self->odd);
    Py_XSETREF(self->fields, PyDict_Copy(self->template));
    if (self->fields == NULL)
        return keep_error(self, "`on_message_begin` callback error", -1);
    return 0;
}

static int
cb_url(llhttp_t *p, const char *at, size_t length)
{
    Parser *self = (Parser *)p->data;
    if (buf_add(&self->bufs[URL], at, length) < 0)
        return keep_error(self, "`on_url` callback error", HPE_USER);
    if (self->bufs[URL].len > self->max_url) {
        PyObject *url = PyBytes_FromStringAndSize(self->bufs[URL].data, self->bufs[URL].len);
        PyObject *result = url == NULL ? NULL : call1(self->on_url, url);
        if (result == NULL)
            return keep_error(self, "`on_url` callback error", HPE_USER);
        Py_DECREF(result);
    }
    return 0;
}

static int
cb_header_field(llhttp_t *p, const char *at, size_t length)
{
    Parser *self = (Parser *)p->data;
    if (buf_add(&self->bufs[NAME], at, length) < 0)
        return keep_error(self, "`on_header_field` callback error", HPE_USER);
    return 0;
}

static int
cb_header_value(llhttp_t *p, const char *at, size_t length)
{
    Parser *self = (Parser *)p->data;
    if (buf_add(&self->bufs[VALUE], at, length) < 0)
        return keep_error(self, "`on_header_value` callback error", HPE_USER);
    return 0;
}

/* A head field: filed here when its name is known and new, else kept for the
   reader. A trailer field goes to the reader as it is. */
static int
file_field(Parser *self)
{
    Py_ssize_t vlen = self->bufs[VALUE].len;
    PyObject *name = PyBytes_FromStringAndSize(self->bufs[NAME].data, self->bufs[NAME].len);
    if (name == NULL)
        return -1;
    if (self->state != HEAD) {
        PyObject *value = PyBytes_FromStringAndSize(self->bufs[VALUE].data, vlen);
        PyObject *result = value == NULL ? NULL
            : PyObject_CallFunctionObjArgs(self->on_header, name, value, NULL);
        Py_DECREF(name);
        Py_XDECREF(value);
        if (result == NULL)
            return -1;
        Py_DECREF(result);
        return 0;
    }
    const char *value_at = self->bufs[VALUE].data;
    while (vlen > 0 && (value_at[vlen - 1] == ' ' || value_at[vlen - 1] == '\t'))
        vlen--;
    self->size += self->bufs[NAME].len + vlen + 4;
    PyObject *key = PyDict_GetItemWithError(self->keys, name);   /* borrowed */
    if (key == NULL && PyErr_Occurred()) {
        Py_DECREF(name);
        return -1;
    }
    /* Once one field is left to the reader, so are all after it: the reader
       files them in order (a repeated field's values are joined in the order
       received, which X-Forwarded-For's meaning depends on). */
    int present = key == NULL || self->odd != NULL ? 1 : PyDict_Contains(self->fields, key);
    if (present < 0) {
        Py_DECREF(name);
        return -1;
    }
    if (!present) {
        Py_DECREF(name);
        PyObject *value = PyUnicode_DecodeLatin1(self->bufs[VALUE].data, vlen, NULL);
        if (value == NULL)
            return -1;
        int failed = PyDict_SetItem(self->fields, key, value);
        Py_DECREF(value);
        return failed;
    }
    PyObject *value = PyBytes_FromStringAndSize(self->bufs[VALUE].data, vlen);
    PyObject *pair = value == NULL ? NULL : PyTuple_Pack(2, name, value);
    Py_DECREF(name);
    Py_XDECREF(value);
    if (pair == NULL)
        return -1;
    if (self->odd == NULL && (self->odd = PyList_New(0)) == NULL) {
        Py_DECREF(pair);
        return -1;
    }
    int failed = PyList_Append(self->odd, pair);
    Py_DECREF(pair);
    return failed;
}

static int
cb_header_value_complete(llhttp_t *p)
{
    Parser *self = (Parser *)p->data;
    int failed = file_field(self);
    self->bufs[NAME].len = self->bufs[VALUE].len = 0;
    if (failed < 0)
        return keep_error(self, "`on_header` callback error", HPE_USER);
    return 0;
}

static int
cb_headers_complete(llhttp_t *p)
{
    Parser *self = (Parser *)p->data;
    PyObject *version;
    if (p->http_major == 1 && p->http_minor == 1)
        version = Py_NewRef(version_11);
    else if (p->http_major == 1 && p->http_minor == 0)
        version = Py_NewRef(version_10);
    else
        version = PyUnicode_FromFormat("%d.%d", p->http_major, p->http_minor);
    PyObject *target = PyBytes_FromStringAndSize(self->bufs[URL].data, self->bufs[URL].len);
    PyObject *size = PyLong_FromSsize_t(self->size);
    PyObject *fields = self->fields, *odd = self->odd;
    self->fields = self->odd = NULL;   /* the reader's from here */
    PyObject *result = NULL;
    if (version != NULL && target != NULL && size != NULL) {
        PyObject *args[6] = {method_names[p->method & 63], target, version, fields,
                             odd != NULL ? odd : Py_None, size};
        result = PyObject_Vectorcall(self->on_head, args, 6, NULL);
    }
    Py_XDECREF(version);
    Py_XDECREF(target);
    Py_XDECREF(size);
    Py_XDECREF(fields);
    Py_XDECREF(odd);
    if (result == NULL)
        return keep_error(self, "`on_headers_complete` callback error", -1);
    Py_DECREF(result);
    self->state = BODY;
    /* We switch to no other protocol (RFC 9110 7.8 lets a server ignore
       Upgrade): the request is an HTTP/1.1 one, its body read as usual, and
       what follows it is HTTP again. */
    p->upgrade = 0;
    return 0;
}

static int
cb_body(llhttp_t *p, const char *at, size_t length)
{
    Parser *self = (Parser *)p->data;
    PyObject *data = PyBytes_FromStringAndSize(at, length);
    PyObject *result = data == NULL ? NULL : call1(self->on_body, data);
    if (result == NULL)
        return keep_error(self, "`on_body` callback error", HPE_USER);
    Py_DECREF(result);
    return 0;
}

static int
cb_message_complete(llhttp_t *p)
{
    Parser *self = (Parser *)p->data;
    self->state = IDLE;
    PyObject *result = PyObject_CallOneArg(self->on_message_complete,
                                           llhttp_should_keep_alive(p) ? Py_True : Py_False);
    if (result == NULL)
        return keep_error(self, "`on_message_complete` callback error", -1);
    Py_DECREF(result);
    return 0;
}

/* -- the type ------------------------------------------------------------ */

static int
Parser_init(Parser *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"protocol", "template", "keys", "max_url", NULL};
    PyObject *protocol, *template, *keys;
    Py_ssize_t max_url;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!O!n", names, &protocol,
                                     &PyDict_Type, &template, &PyDict_Type, &keys, &max_url))
        return -1;
    PyObject *on_head = PyObject_GetAttrString(protocol, "on_head");
    PyObject *on_header = PyObject_GetAttrString(protocol, "on_header");
    PyObject *on_body = PyObject_GetAttrString(protocol, "on_body");
    PyObject *on_message_complete = PyObject_GetAttrString(protocol, "on_message_complete");
    PyObject *on_url = PyObject_GetAttrString(protocol, "on_url");
    Py_XSETREF(self->on_head, on_head);
    Py_XSETREF(self->on_header, on_header);
    Py_XSETREF(self->on_body, on_body);
    Py_XSETREF(self->on_message_complete, on_message_complete);
    Py_XSETREF(self->on_url, on_url);
    if (!on_head || !on_header || !on_body || !on_message_complete || !on_url)
        return -1;
    Py_XSETREF(self->template, Py_NewRef(template));
    Py_XSETREF(self->keys, Py_NewRef(keys));
    self->max_url = max_url;
    llhttp_init(&self->parser, HTTP_REQUEST, &settings);
    self->parser.data = self;
    self->state = IDLE;
    return 0;
}

static int
Parser_traverse(Parser *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_head);
    Py_VISIT(self->on_header);
    Py_VISIT(self->on_body);
    Py_VISIT(self->on_message_complete);
    Py_VISIT(self->on_url);
    Py_VISIT(self->template);
    Py_VISIT(self->keys);
    Py_VISIT(self->fields);
    Py_VISIT(self->odd);
    Py_VISIT(self->error);
    return 0;
}

static int
Parser_clear(Parser *self)
{
    Py_CLEAR(self->on_head);
    Py_CLEAR(self->on_header);
    Py_CLEAR(self->on_body);
    Py_CLEAR(self->on_message_complete);
    Py_CLEAR(self->on_url);
    Py_CLEAR(self->template);
    Py_CLEAR(self->keys);
    Py_CLEAR(self->fields);
    Py_CLEAR(self->odd);
    Py_CLEAR(self->error);
    return 0;
}

static void
Parser_dealloc(Parser *self)
{
    PyObject_GC_UnTrack(self);
    Parser_clear(self);
    for (int i = 0; i < BUFS; i++)
        PyMem_Free(self->bufs[i].data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static void
borrow_bufs(Parser *self)
{
    for (int i = 0; i < BUFS; i++) {
        PyMem_Free(self->bufs[i].data);   /* (none: given back when the last feed ended) */
        self->bufs[i] = spare[i];
        self->bufs[i].len = 0;
        spare[i] = (Buf){NULL, 0, 0};
    }
}

static void
give_back_bufs(Parser *self)
{
    for (int i = 0; i < BUFS; i++) {
        Buf *b = &self->bufs[i];
        if (spare[i].data == NULL && b->cap <= BUF_KEPT)
            spare[i] = *b;
        else
            PyMem_Free(b->data);
        *b = (Buf){NULL, 0, 0};
    }
}

static PyObject *
raise_llhttp_error(Parser *self, llhttp_errno_t err)
{
    PyObject *cls;
    if (self->error != NULL)   /* one of our callbacks failed (llhttp's code names which) */
        cls = CallbackError;
    else if (err == HPE_INVALID_METHOD)
        cls = InvalidMethodError;
    else if (err == HPE_INVALID_URL)
        cls = InvalidURLError;
    else
        cls = ParserError;
    const char *reason = llhttp_get_error_reason(&self->parser);
    PyObject *text = PyUnicode_DecodeLatin1(reason ? reason : "", reason ? strlen(reason) : 0,
                                            NULL);
    PyObject *exc = text == NULL ? NULL : call1(cls, text);
    if (exc == NULL)
        return NULL;
    if (self->error != NULL) {
        PyException_SetContext(exc, self->error);   /* steals the reference */
        self->error = NULL;
    }
    PyErr_SetObject(cls, exc);
    Py_DECREF(exc);
    return NULL;
}

static PyObject *
Parser_feed_data(Parser *self, PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (self->state == IDLE)
        borrow_bufs(self);
    llhttp_errno_t err = llhttp_execute(&self->parser, view.buf, view.len);
    if (self->state == IDLE)
        give_back_bufs(self);
    if (err == HPE_PAUSED_UPGRADE && self->parser.upgrade) {
        /* As httptools: say where the upgraded bytes begin, and go on
           parsing HTTP if fed again. */
        Py_ssize_t at = llhttp_get_error_pos(&self->parser) - (const char *)view.buf;
        PyBuffer_Release(&view);
        llhttp_resume_after_upgrade(&self->parser);
        PyObject *offset = PyLong_FromSsize_t(at);
        if (offset != NULL) {
            PyErr_SetObject(Upgrade, offset);
            Py_DECREF(offset);
        }
        return NULL;
    }
    PyBuffer_Release(&view);
    if (err != HPE_OK)
        return raise_llhttp_error(self, err);
    Py_RETURN_NONE;
}

static PyObject *
Parser_set_lenient_version(Parser *self, PyObject *flag)
{
    int enabled = PyObject_IsTrue(flag);
    if (enabled < 0)
        return NULL;
    llhttp_set_lenient_version(&self->parser, enabled);
    Py_RETURN_NONE;
}

static PyObject *
Parser_get_method(Parser *self, PyObject *unused)
{
    return PyUnicode_AsLatin1String(method_names[self->parser.method & 63]);
}

static PyObject *
Parser_get_in_head(Parser *self, void *closure)
{
    return PyBool_FromLong(self->state == HEAD);
}

static PyObject *
Parser_get_in_message(Parser *self, void *closure)
{
    return PyBool_FromLong(self->state != IDLE);
}

static PyObject *
Parser_get_pending(Parser *self, void *closure)
{
    /* What is held for an unfinished head: its target and field bytes. */
    if (self->state != HEAD)
        return PyLong_FromLong(0);
    return PyLong_FromSsize_t(self->bufs[URL].len + self->size + self->bufs[NAME].len
                              + self->bufs[VALUE].len);
}

static PyObject *
Parser_get_url(Parser *self, void *closure)
{
    return PyBytes_FromStringAndSize(self->bufs[URL].data, self->bufs[URL].len);
}

static PyObject *
Parser_set_template(Parser *self, PyObject *template)
{
    if (!PyDict_Check(template)) {
        PyErr_SetString(PyExc_TypeError, "the template is a dict");
        return NULL;
    }
    Py_XSETREF(self->template, Py_NewRef(template));
    Py_RETURN_NONE;
}

static PyMethodDef Parser_methods[] = {
    {"feed_data", (PyCFunction)Parser_feed_data, METH_O, "Parse bytes (see the module)."},
    {"set_lenient_version", (PyCFunction)Parser_set_lenient_version, METH_O,
     "Accept any HTTP/x.y version (llhttp's lenient_version)."},
    {"get_method", (PyCFunction)Parser_get_method, METH_NOARGS, "The method's name, bytes."},
    {"set_template", (PyCFunction)Parser_set_template, METH_O,
     "The dict the next heads' fields start from."},
    {NULL}
};

static PyGetSetDef Parser_getset[] = {
    {"in_head", (getter)Parser_get_in_head, NULL, "A head is begun and not complete.", NULL},
    {"in_message", (getter)Parser_get_in_message, NULL, "A request is begun and not complete.",
     NULL},
    {"pending", (getter)Parser_get_pending, NULL,
     "Bytes of an unfinished head held: its target, its fields (0 outside a head).", NULL},
    {"url", (getter)Parser_get_url, NULL, "The target so far, bytes.", NULL},
    {NULL}
};

static PyTypeObject ParserType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "prefork.http._llhttp.Parser",
    .tp_basicsize = sizeof(Parser),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "llhttp request parser: Parser(protocol, template, keys, max_url).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Parser_init,
    .tp_dealloc = (destructor)Parser_dealloc,
    .tp_traverse = (traverseproc)Parser_traverse,
    .tp_clear = (inquiry)Parser_clear,
    .tp_methods = Parser_methods,
    .tp_getset = Parser_getset,
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "prefork.http._llhttp",
    .m_doc = "llhttp driven for RequestReader: one Python call per head.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__llhttp(void)
{
    llhttp_settings_init(&settings);
    settings.on_message_begin = cb_message_begin;
    settings.on_url = cb_url;
    settings.on_header_field = cb_header_field;
    settings.on_header_value = cb_header_value;
    settings.on_header_value_complete = cb_header_value_complete;
    settings.on_headers_complete = cb_headers_complete;
    settings.on_body = cb_body;
    settings.on_message_complete = cb_message_complete;

#define METHOD_NAME(NUMBER, NAME, STRING) \
    if ((method_names[NUMBER] = PyUnicode_InternFromString(#STRING)) == NULL) \
        return NULL;
    HTTP_ALL_METHOD_MAP(METHOD_NAME)
#undef METHOD_NAME
    for (int i = 0; i < 64; i++) {
        if (method_names[i] == NULL && (method_names[i] = PyUnicode_InternFromString("-")) == NULL)
            return NULL;
    }
    version_11 = PyUnicode_InternFromString("1.1");
    version_10 = PyUnicode_InternFromString("1.0");
    PyObject *httptools = PyImport_ImportModule("httptools");
    if (httptools == NULL || version_11 == NULL || version_10 == NULL)
        return NULL;
    ParserError = PyObject_GetAttrString(httptools, "HttpParserError");
    CallbackError = PyObject_GetAttrString(httptools, "HttpParserCallbackError");
    InvalidMethodError = PyObject_GetAttrString(httptools, "HttpParserInvalidMethodError");
    InvalidURLError = PyObject_GetAttrString(httptools, "HttpParserInvalidURLError");
    Upgrade = PyObject_GetAttrString(httptools, "HttpParserUpgrade");
    Py_DECREF(httptools);
    if (!ParserError || !CallbackError || !InvalidMethodError || !InvalidURLError || !Upgrade)
        return NULL;
    if (PyType_Ready(&ParserType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Parser", (PyObject *)&ParserType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
