/* megapt.data._segcache: split text into BPE-safe segments and cache their token ids.
 *
 * A document is cut between adjacent characters (a, b) when
 *   - b is a space and a is not, or
 *   - neither is a space and their classes differ, or
 *   - both are digits (every digit is its own segment),
 * with the classes L (ASCII letters and every non-ASCII code point), D (ASCII digits) and
 * P (every other non-space ASCII character: punctuation, '_', '\n', '\t', ...). Leading spaces
 * belong to the run that follows them; trailing spaces at the end of the text are a segment.
 *
 * SentencePiece BPE only merges adjacent symbols into vocabulary pieces, so when no piece of
 * the vocabulary contains a cut (megapt/data/tokenizer.py checks every piece with `split` at
 * load time), a document's ids are the concatenation of its segments' ids. This module only
 * does the bookkeeping: the ids of a new segment come from sentencepiece itself (`add`).
 *
 *   cache = SegmentCache()
 *   r = cache.encode(text, 2)   # bytearray of little-endian uint16 ids, or list of missing segments
 *   cache.add(missing, sp.encode(missing))
 *
 * Non-ASCII code points never split (class L), so cuts always fall on UTF-8 character
 * boundaries. Plain C, CPython C API only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { C_SPACE = 0, C_LETTER = 1, C_DIGIT = 2, C_PUNCT = 3 };
static uint8_t CLS[256];

static void init_classes(void) {
    for (int c = 0; c < 256; c++) {
        if (c == ' ')
            CLS[c] = C_SPACE;
        else if (c >= 0x80 || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
            CLS[c] = C_LETTER;
        else if (c >= '0' && c <= '9')
            CLS[c] = C_DIGIT;
        else
            CLS[c] = C_PUNCT;
    }
}

/* End of the segment that starts at s[i] (i < n). */
static inline Py_ssize_t seg_end(const uint8_t *s, Py_ssize_t i, Py_ssize_t n) {
    while (i < n && s[i] == ' ') i++;
    if (i == n) return n;
    uint8_t c = CLS[s[i++]];
    if (c == C_DIGIT) return i;
    while (i < n && CLS[s[i]] == c) i++;
    return i;
}

static inline uint64_t hash_bytes(const uint8_t *p, Py_ssize_t n) {
    uint64_t h = 1469598103934665603ULL; /* FNV-1a, then a final mix for the table index */
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 32;
    return h;
}

typedef struct {
    uint64_t hash;
    uint64_t key_off; /* into keys */
    uint64_t ids_off; /* into ids */
    uint32_t key_len; /* 0: empty slot (segments are never empty) */
    uint32_t n_ids;
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    size_t cap, n; /* cap: power of two */
    uint8_t *keys;
    size_t keys_len, keys_cap;
    uint32_t *ids;
    size_t ids_len, ids_cap;
    uint32_t *out; /* scratch for encode */
    size_t out_cap;
} SegmentCache;

#define INITIAL_CAP 1024

static int grow(void **buf, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 256;
    while (c < need) c *= 2;
    void *p = PyMem_Realloc(*buf, c * elem);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    *buf = p;
    *cap = c;
    return 0;
}

static Slot *find(SegmentCache *self, uint64_t h, const uint8_t *k, Py_ssize_t len) {
    size_t mask = self->cap - 1;
    for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
        Slot *s = &self->slots[i];
        if (s->key_len == 0) return NULL;
        if (s->hash == h && s->key_len == (uint32_t)len && memcmp(self->keys + s->key_off, k, len) == 0)
            return s;
    }
}

static int rehash(SegmentCache *self, size_t cap) {
    Slot *slots = PyMem_Calloc(cap, sizeof(Slot));
    if (!slots) {
        PyErr_NoMemory();
        return -1;
    }
    size_t mask = cap - 1;
    for (size_t j = 0; j < self->cap; j++) {
        Slot *s = &self->slots[j];
        if (s->key_len == 0) continue;
        size_t i = (size_t)s->hash & mask;
        while (slots[i].key_len) i = (i + 1) & mask;
        slots[i] = *s;
    }
    PyMem_Free(self->slots);
    self->slots = slots;
    self->cap = cap;
    return 0;
}

static int reset(SegmentCache *self) {
    PyMem_Free(self->slots);
    PyMem_Free(self->keys);
    PyMem_Free(self->ids);
    self->keys = NULL;
    self->ids = NULL;
    self->keys_len = self->keys_cap = self->ids_len = self->ids_cap = 0;
    self->n = 0;
    self->cap = INITIAL_CAP;
    self->slots = PyMem_Calloc(self->cap, sizeof(Slot));
    if (!self->slots) {
        self->cap = 0;
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int SegmentCache_init(SegmentCache *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":SegmentCache", kwlist)) return -1;
    return reset(self);
}

static void SegmentCache_dealloc(SegmentCache *self) {
    PyMem_Free(self->slots);
    PyMem_Free(self->keys);
    PyMem_Free(self->ids);
    PyMem_Free(self->out);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The UTF-8 bytes of a str (cached inside the str object by CPython); NULL with an error set. */
static const uint8_t *utf8_of(PyObject *text, Py_ssize_t *n) {
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "expected str, got %.100s", Py_TYPE(text)->tp_name);
        return NULL;
    }
    return (const uint8_t *)PyUnicode_AsUTF8AndSize(text, n);
}

static PyObject *SegmentCache_split(SegmentCache *self, PyObject *text) {
    Py_ssize_t n;
    const uint8_t *s = utf8_of(text, &n);
    if (!s) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t j = seg_end(s, i, n);
        PyObject *u = PyUnicode_DecodeUTF8((const char *)s + i, j - i, "strict");
        if (!u || PyList_Append(out, u) < 0) {
            Py_XDECREF(u);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(u);
        i = j;
    }
    return out;
}

static PyObject *SegmentCache_encode(SegmentCache *self, PyObject *args) {
    PyObject *text;
    int width;
    if (!PyArg_ParseTuple(args, "Oi:encode", &text, &width)) return NULL;
    if (width != 2 && width != 4) {
        PyErr_SetString(PyExc_ValueError, "width must be 2 (uint16) or 4 (uint32)");
        return NULL;
    }
    if (!self->slots && reset(self) < 0) return NULL; /* __init__ skipped by a subclass */
    Py_ssize_t n;
    const uint8_t *s = utf8_of(text, &n);
    if (!s) return NULL;
    size_t nout = 0;
    PyObject *missing = NULL, *seen = NULL;
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t j = seg_end(s, i, n);
        Slot *sl = find(self, hash_bytes(s + i, j - i), s + i, j - i);
        if (sl && !missing) {
            if (grow((void **)&self->out, &self->out_cap, nout + sl->n_ids, sizeof(uint32_t)) < 0) return NULL;
            memcpy(self->out + nout, self->ids + sl->ids_off, sl->n_ids * sizeof(uint32_t));
            nout += sl->n_ids;
        } else if (!sl) {
            if (!missing) {
                missing = PyList_New(0);
                seen = PySet_New(NULL);
                if (!missing || !seen) goto error;
            }
            PyObject *u = PyUnicode_DecodeUTF8((const char *)s + i, j - i, "strict");
            if (!u) goto error;
            int has = PySet_Contains(seen, u);
            if (has < 0 || (!has && (PySet_Add(seen, u) < 0 || PyList_Append(missing, u) < 0))) {
                Py_DECREF(u);
                goto error;
            }
            Py_DECREF(u);
        }
        i = j;
    }
    if (missing) {
        Py_DECREF(seen);
        return missing;
    }
    PyObject *res = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(nout * width));
    if (!res) return NULL;
    uint8_t *o = (uint8_t *)PyByteArray_AS_STRING(res);
    for (size_t k = 0; k < nout; k++) {
        uint32_t v = self->out[k];
        if (width == 2) {
            if (v > 0xFFFF) {
                Py_DECREF(res);
                PyErr_Format(PyExc_OverflowError, "token id %u does not fit in uint16", v);
                return NULL;
            }
            o[2 * k] = (uint8_t)v;
            o[2 * k + 1] = (uint8_t)(v >> 8);
        } else {
            o[4 * k] = (uint8_t)v;
            o[4 * k + 1] = (uint8_t)(v >> 8);
            o[4 * k + 2] = (uint8_t)(v >> 16);
            o[4 * k + 3] = (uint8_t)(v >> 24);
        }
    }
    return res;
error:
    Py_XDECREF(missing);
    Py_XDECREF(seen);
    return NULL;
}

static PyObject *SegmentCache_add(SegmentCache *self, PyObject *args) {
    PyObject *segs_in, *ids_in;
    if (!PyArg_ParseTuple(args, "OO:add", &segs_in, &ids_in)) return NULL;
    if (!self->slots && reset(self) < 0) return NULL;
    PyObject *segs = PySequence_Fast(segs_in, "segments must be a sequence of str");
    if (!segs) return NULL;
    PyObject *idss = PySequence_Fast(ids_in, "ids must be a sequence of int sequences");
    if (!idss) {
        Py_DECREF(segs);
        return NULL;
    }
    Py_ssize_t m = PySequence_Fast_GET_SIZE(segs);
    if (PySequence_Fast_GET_SIZE(idss) != m) {
        PyErr_SetString(PyExc_ValueError, "segments and ids differ in length");
        goto error;
    }
    for (Py_ssize_t k = 0; k < m; k++) {
        Py_ssize_t len;
        const uint8_t *key = utf8_of(PySequence_Fast_GET_ITEM(segs, k), &len);
        if (!key) goto error;
        if (len == 0 || len > (Py_ssize_t)UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "a segment must be a non-empty str");
            goto error;
        }
        uint64_t h = hash_bytes(key, len);
        if (find(self, h, key, len)) continue;
        PyObject *ids = PySequence_Fast(PySequence_Fast_GET_ITEM(idss, k), "ids must be a sequence of int sequences");
        if (!ids) goto error;
        Py_ssize_t ni = PySequence_Fast_GET_SIZE(ids);
        if (grow((void **)&self->ids, &self->ids_cap, self->ids_len + ni, sizeof(uint32_t)) < 0 ||
            grow((void **)&self->keys, &self->keys_cap, self->keys_len + len, 1) < 0) {
            Py_DECREF(ids);
            goto error;
        }
        for (Py_ssize_t t = 0; t < ni; t++) {
            unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(ids, t));
            if ((v == (unsigned long)-1 && PyErr_Occurred()) || v > UINT32_MAX) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_OverflowError, "token id does not fit in uint32");
                Py_DECREF(ids);
                goto error;
            }
            self->ids[self->ids_len + t] = (uint32_t)v;
        }
        Py_DECREF(ids);
        if ((self->n + 1) * 2 > self->cap && rehash(self, self->cap * 2) < 0) goto error;
        size_t mask = self->cap - 1, i = (size_t)h & mask;
        while (self->slots[i].key_len) i = (i + 1) & mask;
        Slot *sl = &self->slots[i];
        sl->hash = h;
        sl->key_off = self->keys_len;
        sl->key_len = (uint32_t)len;
        sl->ids_off = self->ids_len;
        sl->n_ids = (uint32_t)ni;
        memcpy(self->keys + self->keys_len, key, len);
        self->keys_len += len;
        self->ids_len += ni;
        self->n++;
    }
    Py_DECREF(segs);
    Py_DECREF(idss);
    Py_RETURN_NONE;
error:
    Py_DECREF(segs);
    Py_DECREF(idss);
    return NULL;
}

static PyObject *SegmentCache_clear(SegmentCache *self, PyObject *Py_UNUSED(ignored)) {
    if (reset(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static Py_ssize_t SegmentCache_len(SegmentCache *self) { return (Py_ssize_t)self->n; }

static PyObject *SegmentCache_nbytes(SegmentCache *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSize_t(self->cap * sizeof(Slot) + self->keys_cap + self->ids_cap * sizeof(uint32_t) +
                             self->out_cap * sizeof(uint32_t));
}

static PyMethodDef SegmentCache_methods[] = {
    {"split", (PyCFunction)SegmentCache_split, METH_O, "split(text) -> list of segments (str)"},
    {"encode", (PyCFunction)SegmentCache_encode, METH_VARARGS,
     "encode(text, width) -> bytearray of little-endian ids (width 2 or 4 bytes each) when every segment "
     "is cached, else the list of the distinct missing segments"},
    {"add", (PyCFunction)SegmentCache_add, METH_VARARGS,
     "add(segments, ids) -> None: cache ids[k] (a sequence of int) for segments[k]"},
    {"clear", (PyCFunction)SegmentCache_clear, METH_NOARGS, "clear() -> None: drop every entry, free the memory"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef SegmentCache_getset[] = {
    {"nbytes", (getter)SegmentCache_nbytes, NULL, "bytes of memory held", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods SegmentCache_as_sequence = {
    .sq_length = (lenfunc)SegmentCache_len,
};

static PyTypeObject SegmentCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "megapt.data._segcache.SegmentCache",
    .tp_doc = "SegmentCache(): segment (str) -> token ids, with the BPE-safe split",
    .tp_basicsize = sizeof(SegmentCache),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SegmentCache_init,
    .tp_dealloc = (destructor)SegmentCache_dealloc,
    .tp_methods = SegmentCache_methods,
    .tp_getset = SegmentCache_getset,
    .tp_as_sequence = &SegmentCache_as_sequence,
};

static struct PyModuleDef segcache_module = {
    PyModuleDef_HEAD_INIT, "megapt.data._segcache",
    "Segment split + token-id cache for exact, fast SentencePiece BPE encoding (see segcache.c).", -1, NULL,
};

PyMODINIT_FUNC PyInit__segcache(void) {
    init_classes();
    if (PyType_Ready(&SegmentCacheType) < 0) return NULL;
    PyObject *m = PyModule_Create(&segcache_module);
    if (!m) return NULL;
    Py_INCREF(&SegmentCacheType);
    if (PyModule_AddObject(m, "SegmentCache", (PyObject *)&SegmentCacheType) < 0) {
        Py_DECREF(&SegmentCacheType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
