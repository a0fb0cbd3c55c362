/* prefork.http._nghttp2: our binding of the vendored libnghttp2 (vendor/nghttp2).

Why: HTTP/2's protocol work (framing, HPACK, flow control, the stream states,
RFC 9113's checks of a request's fields) in pure Python, the h2 library, cost
70% of a worker's CPU on a page of small files, 600 us a stream on this
machine: more than the rest of the request. libnghttp2 is the library behind
curl, Apache's mod_http2 and nghttpx; this binding gives http/http2.py its
events and takes its responses, and nothing more.

Owns: one server-side nghttp2_session, the callbacks that turn what it reads
into events (tuples, below), each response body's bytes queued until the
session frames them (the data provider), and the frames' bytes out.
Must not: decide anything about requests (http/http2.py does: limits,
refusals, the flood budget), or do I/O.

Events from receive(), each a tuple, kind first:
  (HEAD, stream_id, [(name, value), ...], ended)  a request's head (pseudo-headers too)
  (DATA, stream_id, bytes)                        body bytes
  (EMPTY, stream_id)                              a DATA frame with nothing in it, not the end
  (END, stream_id)                                the request is complete (after DATA or trailers)
  (RESET, stream_id)                              the client reset the stream
  (CLOSED, stream_id)                             the session closed it on an error of its own
  (WINDOW,)                                       flow-control room grew
  (SETTINGS,)                                     the client's SETTINGS (not an ACK)
  (IDLE,)                                         a frame that does no work: PING, PRIORITY, unknown
  (GOAWAY,)                                       the client's GOAWAY
`failed` is then the error code the connection ends with (-1 while it lives).
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <nghttp2/nghttp2.h>

enum { EV_HEAD, EV_DATA, EV_EMPTY, EV_END, EV_RESET, EV_CLOSED, EV_WINDOW, EV_SETTINGS,
       EV_IDLE, EV_GOAWAY };

/* A response body's bytes, queued until the session frames them. */
typedef struct Out {
    struct Out *prev, *next;
    int32_t stream_id;
    char *buf;
    size_t start, end, cap;
    int eof;        /* no more bytes will come: END_STREAM after these */
    int deferred;   /* the provider said DEFERRED: resume when bytes come */
    int reset_after;   /* RST_STREAM NO_ERROR once the response is out */
} Out;

typedef struct {
    PyObject_HEAD
    nghttp2_session *session;
    PyObject *events;          /* the list receive() is filling */
    PyObject *later;           /* events from inside output(), for the next receive() */
    int32_t client_reset;      /* the stream of the RST_STREAM being read */
    PyObject *head;            /* the fields of the header block being read */
    int32_t head_stream;
    size_t head_size;          /* decoded size of that block, as RFC 7541 counts it */
    size_t max_list;           /* the header list size we announced */
    size_t queued;             /* body bytes queued, all streams */
    Out outs;                  /* sentinel of the list of Outs */
    int failed;                /* the error code the connection ends with, or -1 */
    PyObject *after;           /* bytes to send after the session's (our own GOAWAY) */
    char *out;                 /* the session's frames gathered, not yet taken by output() */
    size_t out_size, out_cap;
    int error;                 /* a Python exception is set inside a callback */
} Engine;

static int gather(Engine *self);

static Out *out_of(Engine *self, int32_t stream_id) {
    return nghttp2_session_get_stream_user_data(self->session, stream_id);
}

static void out_free(Engine *self, Out *out) {
    out->prev->next = out->next;
    out->next->prev = out->prev;
    self->queued -= out->end - out->start;
    PyMem_Free(out->buf);
    PyMem_Free(out);
}

static int push(Engine *self, PyObject *event) {
    if (event == NULL) {
        self->error = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    if (self->events == NULL && self->later == NULL)
        self->later = PyList_New(0);
    PyObject *into = self->events != NULL ? self->events : self->later;
    int rv = into != NULL ? PyList_Append(into, event) : -1;
    Py_DECREF(event);
    if (rv < 0) {
        self->error = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
}

/* -- callbacks ------------------------------------------------------------ */
static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *data) {
    Engine *self = data;
    Py_CLEAR(self->head);
    self->head = PyList_New(0);
    if (self->head == NULL) {
        self->error = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    self->head_stream = frame->hd.stream_id;
    self->head_size = 0;
    return 0;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame,
                     const uint8_t *name, size_t namelen, const uint8_t *value,
                     size_t valuelen, uint8_t flags, void *data) {
    Engine *self = data;
    /* The list is bounded while it is decoded: a small block that expands
       past what we announced (an HPACK bomb) ends the connection. */
    self->head_size += namelen + valuelen + 32;
    if (self->head_size > self->max_list) {
        self->failed = NGHTTP2_ENHANCE_YOUR_CALM;
        nghttp2_session_terminate_session(session, NGHTTP2_ENHANCE_YOUR_CALM);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    if (frame->headers.cat != NGHTTP2_HCAT_REQUEST || self->head == NULL)
        return 0;   /* trailers: bounded, not kept */
    PyObject *pair = Py_BuildValue("(y#y#)", name, (Py_ssize_t)namelen,
                                   value, (Py_ssize_t)valuelen);
    if (pair == NULL || PyList_Append(self->head, pair) < 0) {
        Py_XDECREF(pair);
        self->error = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    Py_DECREF(pair);
    return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *data) {
    Engine *self = data;
    int32_t sid = frame->hd.stream_id;
    int ended = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    switch (frame->hd.type) {
    case NGHTTP2_HEADERS:
        if (frame->headers.cat == NGHTTP2_HCAT_REQUEST && self->head != NULL
                && self->head_stream == sid) {
            PyObject *head = self->head;
            self->head = NULL;
            PyObject *event = Py_BuildValue("(iiNO)", EV_HEAD, sid, head,
                                            ended ? Py_True : Py_False);
            return push(self, event);
        }
        return ended ? push(self, Py_BuildValue("(ii)", EV_END, sid)) : 0;
    case NGHTTP2_DATA:
        if (ended)
            return push(self, Py_BuildValue("(ii)", EV_END, sid));
        if (frame->hd.length == 0)
            return push(self, Py_BuildValue("(ii)", EV_EMPTY, sid));
        return 0;
    case NGHTTP2_RST_STREAM:
        self->client_reset = sid;   /* (its close follows: not an event of its own) */
        return push(self, Py_BuildValue("(ii)", EV_RESET, sid));
    case NGHTTP2_WINDOW_UPDATE:
        return push(self, Py_BuildValue("(i)", EV_WINDOW));
    case NGHTTP2_SETTINGS:
        if (frame->hd.flags & NGHTTP2_FLAG_ACK)
            return 0;
        return push(self, Py_BuildValue("(i)", EV_SETTINGS));
    case NGHTTP2_PING:
        if (frame->hd.flags & NGHTTP2_FLAG_ACK)
            return 0;
        return push(self, Py_BuildValue("(i)", EV_IDLE));
    case NGHTTP2_PRIORITY:
    case NGHTTP2_PRIORITY_UPDATE:
        return push(self, Py_BuildValue("(i)", EV_IDLE));
    case NGHTTP2_GOAWAY:
        return push(self, Py_BuildValue("(i)", EV_GOAWAY));
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                         const uint8_t *data, size_t len, void *user_data) {
    Engine *self = user_data;
    return push(self, Py_BuildValue("(iiy#)", EV_DATA, stream_id, data, (Py_ssize_t)len));
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                           void *user_data) {
    Engine *self = user_data;
    Out *out = out_of(self, stream_id);
    if (out != NULL)
        out_free(self, out);
    /* A client's RST_STREAM was an event of its own; an error of the
       session's own (a malformed request: RFC 9113 8.1.1) ends the exchange. */
    if (stream_id == self->client_reset) {
        self->client_reset = 0;
        return 0;
    }
    if (error_code != NGHTTP2_NO_ERROR && error_code != NGHTTP2_CANCEL)
        return push(self, Py_BuildValue("(ii)", EV_CLOSED, stream_id));
    return 0;
}

static int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *data) {
    Engine *self = data;
    if (frame->hd.type == NGHTTP2_DATA && (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        Out *out = out_of(self, frame->hd.stream_id);
        if (out != NULL && out->reset_after)
            nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame->hd.stream_id,
                                      NGHTTP2_NO_ERROR);
        return 0;
    }
    if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR
            && self->failed < 0)
        self->failed = (int)frame->goaway.error_code;
    return 0;
}

/* Unknown frame types are the session's to ignore; counted here (IDLE), as
   a flood of them would otherwise cost nothing to send and something to read. */
static int on_extension_chunk(nghttp2_session *session, const nghttp2_frame_hd *hd,
                              const uint8_t *data, size_t len, void *user_data) {
    return 0;
}

static int unpack_extension(nghttp2_session *session, void **payload, const nghttp2_frame_hd *hd,
                            void *user_data) {
    Engine *self = user_data;
    if (push(self, Py_BuildValue("(i)", EV_IDLE)) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    return NGHTTP2_ERR_CANCEL;
}

static nghttp2_ssize read_body(nghttp2_session *session, int32_t stream_id, uint8_t *buf,
                               size_t length, uint32_t *flags, nghttp2_data_source *source,
                               void *user_data) {
    Engine *self = user_data;
    Out *out = source->ptr;
    size_t n = out->end - out->start;
    if (n > length)
        n = length;
    memcpy(buf, out->buf + out->start, n);
    out->start += n;
    self->queued -= n;
    if (out->start == out->end) {
        out->start = out->end = 0;
        if (out->eof)
            *flags |= NGHTTP2_DATA_FLAG_EOF;
        else if (n == 0) {
            out->deferred = 1;
            return NGHTTP2_ERR_DEFERRED;
        }
    }
    return (nghttp2_ssize)n;
}

/* -- the type ---------------------------------------------------------------- */
static int Engine_init(Engine *self, PyObject *args, PyObject *kwds) {
    unsigned int max_streams, window, frame_size, max_list, connection_window;
    if (!PyArg_ParseTuple(args, "IIIII", &max_streams, &window, &frame_size, &max_list,
                          &connection_window))
        return -1;
    if (self->session != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Engine initialised twice");
        return -1;
    }
    self->outs.next = self->outs.prev = &self->outs;
    self->failed = -1;
    self->max_list = max_list;
    self->after = PyBytes_FromStringAndSize(NULL, 0);
    if (self->after == NULL)
        return -1;

    nghttp2_session_callbacks *cbs;
    nghttp2_option *opt;
    if (nghttp2_session_callbacks_new(&cbs) != 0)
        return PyErr_NoMemory(), -1;
    if (nghttp2_option_new(&opt) != 0) {
        nghttp2_session_callbacks_del(cbs);
        return PyErr_NoMemory(), -1;
    }
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    nghttp2_session_callbacks_set_on_extension_chunk_recv_callback(cbs, on_extension_chunk);
    nghttp2_session_callbacks_set_unpack_extension_callback(cbs, unpack_extension);
    for (int type = 0x0a; type <= 0xff; type++)
        if (type != NGHTTP2_PRIORITY_UPDATE)
            nghttp2_option_set_user_recv_extension_type(opt, (uint8_t)type);
    /* The flood budget (http/http2.py) counts resets in frames, not per
       second: nghttp2's own clock-based limit is left far above it. */
    nghttp2_option_set_stream_reset_rate_limit(opt, UINT64_MAX / 2, UINT64_MAX / 2);
    int rv = nghttp2_session_server_new2(&self->session, cbs, self, opt);
    nghttp2_session_callbacks_del(cbs);
    nghttp2_option_del(opt);
    if (rv != 0) {
        self->session = NULL;
        return PyErr_NoMemory(), -1;
    }
    nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, max_streams},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, window},
        {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, frame_size},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, max_list},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
    };
    rv = nghttp2_submit_settings(self->session, NGHTTP2_FLAG_NONE, settings, 5);
    if (rv == 0 && connection_window)
        rv = nghttp2_submit_window_update(self->session, NGHTTP2_FLAG_NONE, 0,
                                          (int32_t)connection_window);
    if (rv != 0) {
        PyErr_Format(PyExc_ValueError, "nghttp2: %s", nghttp2_strerror(rv));
        return -1;
    }
    return 0;
}

static void Engine_dealloc(Engine *self) {
    if (self->session != NULL)
        nghttp2_session_del(self->session);
    while (self->outs.next != NULL && self->outs.next != &self->outs)
        out_free(self, self->outs.next);
    Py_XDECREF(self->events);
    Py_XDECREF(self->later);
    Py_XDECREF(self->head);
    Py_XDECREF(self->after);
    PyMem_Free(self->out);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ready(Engine *self) {
    if (self->session == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Engine not initialised");
        return 0;
    }
    return 1;
}

static PyObject *Engine_receive(Engine *self, PyObject *arg) {
    Py_buffer view;
    if (!ready(self) || PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *events = self->later != NULL ? self->later : PyList_New(0);
    self->later = NULL;
    self->events = events;
    if (events == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    self->error = 0;
    nghttp2_ssize rv = nghttp2_session_mem_recv2(self->session, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    if (!self->error && rv < 0 && self->failed < 0) {
        /* Fatal to the session (a bad preface, a CONTINUATION flood, a
           flood of frames it must answer): it queued no GOAWAY, so one is
           queued here; the connection ends once it is sent. */
        int code = NGHTTP2_PROTOCOL_ERROR;
        if (rv == NGHTTP2_ERR_FLOODED || rv == NGHTTP2_ERR_TOO_MANY_CONTINUATIONS)
            code = NGHTTP2_ENHANCE_YOUR_CALM;
        else if (rv == NGHTTP2_ERR_NOMEM || rv == NGHTTP2_ERR_CALLBACK_FAILURE)
            code = NGHTTP2_INTERNAL_ERROR;
        self->failed = code;
        nghttp2_session_terminate_session(self->session, (uint32_t)code);
    }
    /* What the input made the session queue is framed now (output() sends
       it): a GOAWAY it queued for a protocol error of the client's is then
       seen by on_frame_send, so that `failed` names its code at once, and
       streams the framing closes are events of this call. */
    if (!self->error && gather(self) < 0)
        self->error = 1;
    self->events = NULL;
    if (self->error) {
        Py_DECREF(events);
        return NULL;
    }
    return events;
}

/* The session's frames into self->out (they come in pieces, each valid
   until the next call): -> 0, or -1 with an exception set. */
static int gather(Engine *self) {
    self->error = 0;
    for (;;) {
        const uint8_t *data;
        nghttp2_ssize n = nghttp2_session_mem_send2(self->session, &data);
        if (n <= 0) {
            if (n < 0 && self->failed < 0)
                self->failed = NGHTTP2_INTERNAL_ERROR;
            break;
        }
        if (self->out_size + (size_t)n > self->out_cap) {
            size_t grown = self->out_cap ? self->out_cap : 16384;
            while (grown < self->out_size + (size_t)n)
                grown *= 2;
            char *more = PyMem_Realloc(self->out, grown);
            if (more == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            self->out = more;
            self->out_cap = grown;
        }
        memcpy(self->out + self->out_size, data, (size_t)n);
        self->out_size += (size_t)n;
    }
    return self->error ? -1 : 0;
}

static PyObject *Engine_output(Engine *self, PyObject *unused) {
    if (!ready(self) || gather(self) < 0)
        return NULL;
    /* Then our own GOAWAY (if any) after the session's frames. */
    Py_ssize_t tail = PyBytes_GET_SIZE(self->after);
    PyObject *result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)self->out_size + tail);
    if (result == NULL)
        return NULL;
    if (self->out_size)
        memcpy(PyBytes_AS_STRING(result), self->out, self->out_size);
    if (tail) {
        memcpy(PyBytes_AS_STRING(result) + self->out_size, PyBytes_AS_STRING(self->after), tail);
        Py_SETREF(self->after, PyBytes_FromStringAndSize(NULL, 0));
        if (self->after == NULL) {
            Py_DECREF(result);
            return NULL;
        }
    }
    self->out_size = 0;
    if (self->out_cap > 262144) {   /* a large body went out: its buffer need not stay */
        PyMem_Free(self->out);
        self->out = NULL;
        self->out_cap = 0;
    }
    return result;
}

/* respond(stream_id, fields, end) -> False if the stream is gone */
static PyObject *Engine_respond(Engine *self, PyObject *args) {
    int stream_id, end;
    PyObject *fields;
    if (!ready(self) || !PyArg_ParseTuple(args, "iO!p", &stream_id, &PyList_Type, &fields, &end))
        return NULL;
    if (nghttp2_session_find_stream(self->session, stream_id) == NULL)
        Py_RETURN_FALSE;
    Py_ssize_t count = PyList_GET_SIZE(fields);
    nghttp2_nv *nva = PyMem_Malloc(sizeof(nghttp2_nv) * (count ? count : 1));
    if (nva == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(fields, i);
        PyObject *name, *value;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2
                || !PyBytes_Check(name = PyTuple_GET_ITEM(pair, 0))
                || !PyBytes_Check(value = PyTuple_GET_ITEM(pair, 1))) {
            PyMem_Free(nva);
            PyErr_SetString(PyExc_TypeError, "fields are (bytes, bytes) pairs");
            return NULL;
        }
        nva[i].name = (uint8_t *)PyBytes_AS_STRING(name);
        nva[i].namelen = (size_t)PyBytes_GET_SIZE(name);
        nva[i].value = (uint8_t *)PyBytes_AS_STRING(value);
        nva[i].valuelen = (size_t)PyBytes_GET_SIZE(value);
        nva[i].flags = NGHTTP2_NV_FLAG_NONE;
    }
    Out *out = NULL;
    nghttp2_data_provider2 provider;
    if (!end) {
        out = PyMem_Calloc(1, sizeof(Out));
        if (out == NULL) {
            PyMem_Free(nva);
            return PyErr_NoMemory();
        }
        out->stream_id = stream_id;
        provider.source.ptr = out;
        provider.read_callback = read_body;
    }
    int rv = nghttp2_submit_response2(self->session, stream_id, nva, (size_t)count,
                                      end ? NULL : &provider);
    PyMem_Free(nva);
    if (rv != 0) {
        PyMem_Free(out);
        if (rv == NGHTTP2_ERR_NOMEM)
            return PyErr_NoMemory();
        Py_RETURN_FALSE;
    }
    if (out != NULL) {
        out->next = &self->outs;
        out->prev = self->outs.prev;
        self->outs.prev->next = out;
        self->outs.prev = out;
        nghttp2_session_set_stream_user_data(self->session, stream_id, out);
    }
    Py_RETURN_TRUE;
}

/* send(stream_id, data, end) -> False if the stream is gone */
static PyObject *Engine_send(Engine *self, PyObject *args) {
    int stream_id, end = 0;
    Py_buffer view;
    if (!ready(self) || !PyArg_ParseTuple(args, "iy*|p", &stream_id, &view, &end))
        return NULL;
    Out *out = out_of(self, stream_id);
    if (out == NULL || out->eof) {
        PyBuffer_Release(&view);
        Py_RETURN_FALSE;
    }
    size_t len = (size_t)view.len;
    if (out->end + len > out->cap) {
        if (out->start) {   /* what was framed makes room first */
            memmove(out->buf, out->buf + out->start, out->end - out->start);
            out->end -= out->start;
            out->start = 0;
        }
        if (out->end + len > out->cap) {
            size_t cap = out->cap ? out->cap : 4096;
            while (cap < out->end + len)
                cap *= 2;
            char *buf = PyMem_Realloc(out->buf, cap);
            if (buf == NULL) {
                PyBuffer_Release(&view);
                return PyErr_NoMemory();
            }
            out->buf = buf;
            out->cap = cap;
        }
    }
    memcpy(out->buf + out->end, view.buf, len);
    out->end += len;
    self->queued += len;
    PyBuffer_Release(&view);
    if (end)
        out->eof = 1;
    if (out->deferred) {
        out->deferred = 0;
        nghttp2_session_resume_data(self->session, stream_id);
    }
    Py_RETURN_TRUE;
}

static PyObject *Engine_end(Engine *self, PyObject *arg) {
    int stream_id = (int)PyLong_AsLong(arg);
    if (!ready(self) || (stream_id == -1 && PyErr_Occurred()))
        return NULL;
    Out *out = out_of(self, stream_id);
    if (out == NULL)
        Py_RETURN_FALSE;
    out->eof = 1;
    if (out->deferred) {
        out->deferred = 0;
        nghttp2_session_resume_data(self->session, stream_id);
    }
    Py_RETURN_TRUE;
}

/* room(stream_id): the bytes the windows let this stream queue now */
static PyObject *Engine_room(Engine *self, PyObject *arg) {
    int stream_id = (int)PyLong_AsLong(arg);
    if (!ready(self) || (stream_id == -1 && PyErr_Occurred()))
        return NULL;
    int32_t stream = nghttp2_session_get_stream_remote_window_size(self->session, stream_id);
    Out *out = out_of(self, stream_id);
    if (stream < 0 || (out != NULL && out->eof))
        return PyLong_FromLong(0);
    long long room = (long long)stream - (long long)(out ? out->end - out->start : 0);
    long long conn = (long long)nghttp2_session_get_remote_window_size(self->session)
                     - (long long)self->queued;
    if (conn < room)
        room = conn;
    return PyLong_FromLongLong(room > 0 ? room : 0);
}

static PyObject *Engine_reset(Engine *self, PyObject *args) {
    int stream_id;
    unsigned int code;
    if (!ready(self) || !PyArg_ParseTuple(args, "iI", &stream_id, &code))
        return NULL;
    if (nghttp2_session_find_stream(self->session, stream_id) == NULL)
        Py_RETURN_NONE;
    /* NO_ERROR: "stop sending, the answer is complete" (RFC 9113 8.1), so it
       follows the answer's body (DATA frames leave after RST_STREAM would). */
    Out *out = out_of(self, stream_id);
    if (code == NGHTTP2_NO_ERROR && out != NULL && out->eof)
        out->reset_after = 1;
    else
        nghttp2_submit_rst_stream(self->session, NGHTTP2_FLAG_NONE, stream_id, code);
    Py_RETURN_NONE;
}

/* terminate(last_stream_id, code): GOAWAY with an error, the end */
static PyObject *Engine_terminate(Engine *self, PyObject *args) {
    int last;
    unsigned int code;
    if (!ready(self) || !PyArg_ParseTuple(args, "iI", &last, &code))
        return NULL;
    if (self->failed < 0)
        self->failed = (int)code;
    nghttp2_session_terminate_session2(self->session, last, code);
    Py_RETURN_NONE;
}

/* graceful(last_stream_id): GOAWAY NO_ERROR, written after the session's
   output. Not through the session: once it has sent one it ignores every
   stream opened after, where we refuse them (REFUSED_STREAM: the client
   knows at once it may retry). RFC 9113 6.8: a 17-byte frame. */
static PyObject *Engine_graceful(Engine *self, PyObject *arg) {
    long last = PyLong_AsLong(arg);
    if (!ready(self) || (last == -1 && PyErr_Occurred()))
        return NULL;
    unsigned char frame[17] = {0, 0, 8, NGHTTP2_GOAWAY, 0, 0, 0, 0, 0};
    frame[9] = (unsigned char)((last >> 24) & 0x7f);
    frame[10] = (unsigned char)(last >> 16);
    frame[11] = (unsigned char)(last >> 8);
    frame[12] = (unsigned char)last;
    PyObject *tail = PyBytes_FromStringAndSize((const char *)frame, 17);
    if (tail == NULL)
        return NULL;
    PyBytes_ConcatAndDel(&self->after, tail);
    if (self->after == NULL)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_get_failed(Engine *self, void *closure) {
    return PyLong_FromLong(self->failed);
}

static PyMethodDef Engine_methods[] = {
    {"receive", (PyCFunction)Engine_receive, METH_O, "bytes in -> the events they made"},
    {"output", (PyCFunction)Engine_output, METH_NOARGS, "the bytes to send"},
    {"respond", (PyCFunction)Engine_respond, METH_VARARGS,
     "respond(stream_id, fields, end) -> False if the stream is gone"},
    {"send", (PyCFunction)Engine_send, METH_VARARGS,
     "send(stream_id, data, end=False) -> False if the stream is gone"},
    {"end", (PyCFunction)Engine_end, METH_O, "end(stream_id) -> False if the stream is gone"},
    {"room", (PyCFunction)Engine_room, METH_O, "room(stream_id) -> bytes it may queue now"},
    {"reset", (PyCFunction)Engine_reset, METH_VARARGS, "reset(stream_id, code)"},
    {"terminate", (PyCFunction)Engine_terminate, METH_VARARGS, "terminate(last_stream_id, code)"},
    {"graceful", (PyCFunction)Engine_graceful, METH_O, "graceful(last_stream_id)"},
    {NULL}
};

static PyGetSetDef Engine_getset[] = {
    {"failed", (getter)Engine_get_failed, NULL, "the error code the connection ends with, or -1"},
    {NULL}
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "prefork.http._nghttp2.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(max_concurrent_streams, initial_window, max_frame_size, "
              "max_header_list_size, connection_window_increment)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "prefork.http._nghttp2", "Our binding of libnghttp2 (server side).",
    -1, NULL,
};

PyMODINIT_FUNC PyInit__nghttp2(void) {
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0
            || PyModule_AddIntConstant(m, "HEAD", EV_HEAD) < 0
            || PyModule_AddIntConstant(m, "DATA", EV_DATA) < 0
            || PyModule_AddIntConstant(m, "EMPTY", EV_EMPTY) < 0
            || PyModule_AddIntConstant(m, "END", EV_END) < 0
            || PyModule_AddIntConstant(m, "RESET", EV_RESET) < 0
            || PyModule_AddIntConstant(m, "CLOSED", EV_CLOSED) < 0
            || PyModule_AddIntConstant(m, "WINDOW", EV_WINDOW) < 0
            || PyModule_AddIntConstant(m, "SETTINGS", EV_SETTINGS) < 0
            || PyModule_AddIntConstant(m, "IDLE", EV_IDLE) < 0
            || PyModule_AddIntConstant(m, "GOAWAY", EV_GOAWAY) < 0
            || PyModule_AddStringConstant(m, "VERSION", NGHTTP2_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
