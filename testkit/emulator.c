/* A CUDA driver (libcuda.so.1) on the host that keeps the driver's rules, for fastema's tests and benchmarks
   (testkit/emulator.py builds it, loads it and reads what it saw). Nothing runs on a device: device memory is host
   memory, copies are memcpy, a kernel launch is recorded (never run). What it holds fastema to:

   - contexts: a stack per thread, empty at its start; every call that needs a current context answers
     CUDA_ERROR_INVALID_CONTEXT without one (counted); a pop of an empty stack is refused; calls before cuInit
     answer CUDA_ERROR_NOT_INITIALIZED;
   - capture (cuStreamBeginCapture/EndCapture, cuThreadExchangeStreamCaptureMode): work queued on a capturing
     stream is captured, not run; the calls the driver does not permit during a capture (allocations and frees,
     host allocations and frees, stream and event synchronisation, event and stream queries) answer
     CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidate the captures that forbid them, for good (global mode: a
     capture of any thread in global mode forbids them to every thread in global mode; thread-local: to its own
     thread; relaxed: to nobody); cuCtxSynchronize, while any stream of its context captures, in any mode and on
     any thread, is refused the same way; the legacy stream (a synchronous copy's too), while a blocking stream of
     its context captures, answers CUDA_ERROR_STREAM_CAPTURE_IMPLICIT and invalidates it, in any mode; library
     loads, cuLibraryGetKernel and cuKernelGetFunction are permitted. These rules are the real driver's as a GPU
     answered them (testkit/driver_rules.py: 504 cases on driver 580.159, bench/results/
     gpu-2026-11-27-h200-driver-rules.json; tests/launch/test_emulator.py holds the emulator to that table;
     measured with pinned host buffers, one context, lazy module loading: pageable copies and other contexts
     are ruled here by analogy, not by measurement); an
     invalidated capture ends with CUDA_ERROR_STREAM_CAPTURE_INVALIDATED and no graph; a graph replays what it
     captured;
   - completion: each stream counts the work queued on it and the work done; an event answers
     CUDA_ERROR_NOT_READY until the work before its record is done. Progress (emu_set_progress): 1 (the
     default) makes that work done once a query has answered NOT_READY for it, 0 only at a synchronisation or
     emu_complete_all(); a pinned block freed while a copy from it is not done is counted (unfinished_frees);
   - every out-parameter written, on success and on error;
   - every launch recorded (emu_launches: function, kernel, grid, block, shared bytes, stream, context, the
     parameter bytes gathered as the driver gathers them, by the kernel's own parameter layout read from the
     image: a cubin's .nv.info KPARAM_INFO and PARAM_CBANK, a PTX entry's .param list) and refused as the
     driver refuses it (a bad handle, no context, a block over 1024 threads or the kernel's own limit, a grid
     out of range, kernelParams and extra both or neither given, a malformed extra);
   - flags: of streams, events and pinned blocks, checked (unknown bits: CUDA_ERROR_INVALID_VALUE) and kept;
   - a fork: as the driver, after cuInit only (CUDA initialised before the fork): every call from such a
     forked child (and its own children) is counted and answers CUDA_ERROR_NOT_INITIALIZED; a child of a
     process that never called cuInit is a fresh process to the driver, its calls work;
   - cuda-bindings' loader asks cuGetProcAddress for every entry point it has: those below are the emulator's
     (each with the real prototype, cuda-bindings' cydriver.pxd: a test compares them); any other one gets a
     function that counts its name as an unknown call and answers CUDA_ERROR_NOT_SUPPORTED. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef int CUdevice;
typedef int CUdevice_attribute;
typedef int CUstreamCaptureStatus;
typedef int CUstreamCaptureMode;
typedef int CUjit_option;
typedef int CUlibraryOption;
typedef int CUdriverProcAddressQueryResult;
typedef uint64_t cuuint64_t;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef struct CUlib_st *CUlibrary;
typedef struct CUkern_st *CUkernel;
typedef struct CUfunc_st *CUfunction;
typedef struct CUgraph_st *CUgraph;
typedef struct CUgraphExec_st *CUgraphExec;

enum { OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_INITIALIZED = 3, INVALID_DEVICE = 101,
       INVALID_IMAGE = 200, INVALID_CONTEXT = 201, INVALID_HANDLE = 400, ILLEGAL_STATE = 401, NOT_FOUND = 500,
       NOT_READY = 600, NOT_SUPPORTED = 801, CAPTURE_UNSUPPORTED = 900, CAPTURE_INVALIDATED = 901,
       CAPTURE_IMPLICIT = 906, CAPTURED_EVENT = 907, CAPTURE_WRONG_THREAD = 908 };
enum { MODE_GLOBAL = 0, MODE_THREAD_LOCAL = 1, MODE_RELAXED = 2 };
enum { STATUS_NONE = 0, STATUS_ACTIVE = 1, STATUS_INVALIDATED = 2 };

/* ------------------------------------------------------------------ what Python reads (ctypes) */
enum { C_CALLS, C_NO_CONTEXT, C_FORKED, C_REFUSED_IN_CAPTURE, C_INVALIDATIONS, C_NOT_READY, C_HOST_WAITS,
       C_UNFINISHED_FREES, C_LAUNCHES, C_CAPTURED, C_REPLAYED, C_BAD_LAUNCHES, C_UNKNOWN, C_DEVICE_ALLOCS,
       C_DEVICE_FREES, C_HOST_ALLOCS, C_HOST_FREES, C_EVENTS, C_EVENTS_DESTROYED, C_STREAMS, C_LOADS,
       C_ASYNC_COPIES, C_SYNC_COPIES, C_ERRORS, C_DEAD_STREAMS, C_COUNTERS };
long long emu_count[C_COUNTERS];
const char *emu_counter_names = "calls no_context forked_calls refused_in_capture invalidations not_ready "
    "host_waits unfinished_frees launches captured_launches replayed_launches bad_launches unknown_calls "
    "device_allocs device_frees host_allocs host_frees events events_destroyed streams library_loads "
    "async_copies sync_copies errors dead_stream_calls";
int emu_version = 1;

#define RING 512
#define PARAM_BYTES 1024
typedef struct {
    unsigned long long seq;               /* 1, 2, ...: the launch's number (replays and captures included) */
    unsigned long long func;              /* the handle launched (a CUfunction, or a CUkernel) */
    long long kernel;                     /* the kernel's index (emu_kernel_name) */
    unsigned int grid[3], block[3], shared;
    unsigned long long stream, context;
    int captured;                         /* the capture it went into (0: queued to run) */
    int replay;                           /* the graph exec that replayed it (0: launched by a call) */
    int nparams, nbytes;                  /* the kernel's parameter count and bank size */
    int extra;                            /* 1: the parameters came through `extra` */
    int packed;                           /* 1: each parameter's address lay at its own offset from the first */
    unsigned char params[PARAM_BYTES];    /* the parameter bank, gathered by the kernel's layout */
} emu_launch;
emu_launch emu_launches[RING];
unsigned long long emu_launch_seq = 0;

unsigned int emu_last_flags[3];           /* of the last stream, event, pinned block made */
int emu_progress = 1;
int emu_devices = 2;

#define NREFUSED 256
typedef struct { int entry; int result; int capturing; } emu_refusal;
emu_refusal emu_refusals[NREFUSED];
unsigned long long emu_refusal_seq = 0;

/* ------------------------------------------------------------------ state */
static int spin = 0;                      /* the state's lock: a spin lock (an uncontended pass: a few instructions) */
static void lock_it(void) { while (__atomic_exchange_n(&spin, 1, __ATOMIC_ACQUIRE)) while (__atomic_load_n(&spin, __ATOMIC_RELAXED)) ; }
static void release_it(void) { __atomic_store_n(&spin, 0, __ATOMIC_RELEASE); }
static int initialized = 0, forked = 0;
#define TLS static __thread __attribute__((tls_model("initial-exec")))
TLS CUcontext stack[64];
TLS int depth = 0;
TLS int thread_mode = MODE_GLOBAL;
TLS int me_token;                         /* its address names the thread */
#define ME ((void *)&me_token)
#define PRIMARY(d) ((CUcontext)(uintptr_t)(0xC0C0 + 0x100 * (d)))

static CUcontext cur(void) { return depth ? stack[depth - 1] : 0; }
static int context_ok(CUcontext c) {
    uintptr_t v = (uintptr_t)c;
    return v >= 0xC0C0 && (v - 0xC0C0) % 0x100 == 0 && (int)((v - 0xC0C0) / 0x100) < emu_devices;
}

typedef struct {
    uintptr_t handle; CUcontext ctx; int legacy, blocking, made; unsigned flags;
    int status, mode, capture; void *thread;
    unsigned long long queued, done;
} stream_t;
#define NSTREAMS 1024
static stream_t streams[NSTREAMS];
static int nstreams = 0;

typedef struct { int alive, stream, captured, told; unsigned flags; CUcontext ctx; unsigned long long target; } event_t;
#define NEVENTS 65536
static event_t events[NEVENTS];
static int nevents = 0;

typedef struct { uintptr_t ptr; size_t size; unsigned flags; int stream; unsigned long long seq; } block_t;
typedef struct { block_t *b; int n, cap; } pool_t;
static pool_t device_pool, host_pool;     /* device memory (host memory here) and pinned host blocks */

typedef struct {
    char *name; int lib, nparams, ngaps; unsigned cbank, max_threads;
    unsigned short *offset, *size; unsigned short gaps[32][2];    /* the padding between parameters: offset, bytes */
} kernel_t;
static kernel_t *kernels;
static int nkernels, cap_kernels, nlibs;
typedef struct { int kernel; CUcontext ctx; } function_t;
static function_t *functions;
static int nfunctions, cap_functions;

typedef struct { emu_launch *launches; int n, cap, ended; } capture_t;
static capture_t *captures;
static int ncaptures, cap_captures;
static int *execs;                        /* exec -> capture */
static int nexecs, cap_execs;

#define LBASE 0x4C000000ULL
#define KBASE 0x4B000000ULL
#define FBASE 0x46000000ULL
#define EBASE 0x45000000ULL
#define SBASE 0x53000000ULL
#define GBASE 0x47000000ULL
#define XBASE 0x48000000ULL
#define INDEX(h, base, n) (((uintptr_t)(h) >= (base) && ((uintptr_t)(h) - (base)) % 8 == 0 \
                            && ((uintptr_t)(h) - (base)) / 8 < (uintptr_t)(n)) ? (int)(((uintptr_t)(h) - (base)) / 8) : -1)
#define HANDLE(type, base, i) ((type)(uintptr_t)((base) + 8 * (uintptr_t)(i)))     /* INDEX's inverse */

static void *grow(void *p, int *cap, int need, size_t item) {
    if (need <= *cap) return p;
    int c = *cap ? *cap * 2 : 64;
    while (c < need) c *= 2;
    void *q = realloc(p, c * item);
    if (!q) abort();
    *cap = c;
    return q;
}

/* ------------------------------------------------------------------ entry bookkeeping */
#define ENTRY_LIST(X) X(cuInit) X(cuDriverGetVersion) X(cuDeviceGet) X(cuDeviceGetCount) X(cuDeviceGetAttribute) \
    X(cuDevicePrimaryCtxRetain) X(cuCtxGetCurrent) X(cuCtxSetCurrent) X(cuCtxPushCurrent) X(cuCtxPopCurrent) \
    X(cuCtxSynchronize) X(cuMemAlloc) X(cuMemFree) X(cuMemHostAlloc) X(cuMemFreeHost) X(cuMemcpyHtoD) \
    X(cuMemcpyHtoDAsync) X(cuMemcpyDtoH) X(cuMemcpyDtoHAsync) X(cuStreamCreate) X(cuStreamDestroy) \
    X(cuStreamSynchronize) X(cuStreamQuery) X(cuStreamIsCapturing) X(cuStreamBeginCapture) X(cuStreamEndCapture) \
    X(cuThreadExchangeStreamCaptureMode) X(cuEventCreate) X(cuEventDestroy) X(cuEventRecord) X(cuEventQuery) \
    X(cuEventSynchronize) X(cuLibraryLoadData) X(cuLibraryUnload) X(cuLibraryGetKernel) X(cuKernelGetFunction) \
    X(cuLaunchKernel) X(cuGraphInstantiate) X(cuGraphLaunch) X(cuGraphDestroy) X(cuGraphExecDestroy) \
    X(cuGetErrorName) X(cuGetErrorString)
#define ID(name) I_##name,
enum { ENTRY_LIST(ID) N_ENTRIES };
#define NAME(name) #name " "
const char *emu_entry_names = ENTRY_LIST(NAME);
long long emu_calls[N_ENTRIES + 1];
long long emu_captured_calls[N_ENTRIES + 1];  /* calls made while a capture was active anywhere */
static int active_captures = 0;

static void unlock_it(int *unused) { (void)unused; release_it(); }
static void child(void) { if (initialized) forked = 1; spin = 0; }   /* CUDA initialised at the fork: refused */
static int forked_call(void) { emu_count[C_FORKED]++; return NOT_INITIALIZED; }

/* Every entry: a forked child's call is counted and refused; the state is locked for the call; counted. */
#define ENTER(name) \
    if (forked) return forked_call(); \
    lock_it(); \
    int held_ __attribute__((cleanup(unlock_it))) = 0; (void)held_; \
    emu_count[C_CALLS]++; emu_calls[I_##name]++; if (active_captures) emu_captured_calls[I_##name]++;
#define NEED_INIT() if (!initialized) return NOT_INITIALIZED;
/* An entry with an out-parameter: written (zero) before any check, so that it is written on error too. */
#define ENTER_OUT(name, out) ENTER(name) *(out) = 0; NEED_INIT()

static CUresult refuse(int entry, CUresult r) {
    emu_refusal *x = &emu_refusals[emu_refusal_seq++ % NREFUSED];
    x->entry = entry; x->result = r; x->capturing = active_captures;
    emu_count[C_ERRORS]++;
    return r;
}
/* A check's refusal returned at once: CHECK(need_context(I_cuMemAlloc)). */
#define CHECK(call) { CUresult e_ = (call); if (e_) return e_; }
static CUresult need_context(int entry) {
    if (cur()) return OK;
    emu_count[C_NO_CONTEXT]++;
    return refuse(entry, INVALID_CONTEXT);
}
static CUresult device_ok(int entry, CUdevice d) {
    return d >= 0 && d < emu_devices ? OK : refuse(entry, INVALID_DEVICE);
}

/* ------------------------------------------------------------------ streams and capture */
static int is_legacy(CUstream h) { uintptr_t v = (uintptr_t)h; return v == 0 || v == 1; }
static int stream_index(CUstream h) {
    uintptr_t v = (uintptr_t)h;
    int legacy = is_legacy(h);
    CUcontext c = cur();
    for (int i = 0; i < nstreams; i++)
        if (legacy ? (streams[i].legacy && streams[i].ctx == c) : (!streams[i].legacy && streams[i].handle == v))
            return i;
    if (nstreams == NSTREAMS) return -1;
    stream_t *s = &streams[nstreams];
    memset(s, 0, sizeof *s);
    s->handle = legacy ? 0 : v; s->ctx = c; s->legacy = legacy; s->blocking = 0;
    return nstreams++;
}

static void invalidate(stream_t *s) {
    if (s->status == STATUS_ACTIVE) { s->status = STATUS_INVALIDATED; emu_count[C_INVALIDATIONS]++; }
}

/* A potentially unsafe call now: the captures that forbid it are invalidated, and it is refused where one did. */
static CUresult unsafe(int entry) {
    if (!active_captures || thread_mode == MODE_RELAXED) return OK;
    int hit = 0;
    for (int i = 0; i < nstreams; i++) {
        stream_t *s = &streams[i];
        if (s->status == STATUS_NONE || s->mode == MODE_RELAXED) continue;
        if (s->thread == ME || (thread_mode == MODE_GLOBAL && s->mode == MODE_GLOBAL)) { invalidate(s); hit = 1; }
    }
    if (!hit) return OK;
    emu_count[C_REFUSED_IN_CAPTURE]++;
    return refuse(entry, CAPTURE_UNSUPPORTED);
}
#define UNSAFE(name) CHECK(unsafe(I_##name))

/* A capture that makes the legacy stream of `ctx` implicit: a blocking stream of that context capturing. */
static int blocks_legacy(const stream_t *s, CUcontext ctx) {
    return s->status != STATUS_NONE && s->blocking && s->ctx == ctx;
}
/* Work queued on the legacy stream while a blocking stream of its context captures: invalidates that capture. */
static int implicit(int si) {
    if (!active_captures || !streams[si].legacy) return 0;
    int hit = 0;
    for (int i = 0; i < nstreams; i++)
        if (blocks_legacy(&streams[i], streams[si].ctx)) { invalidate(&streams[i]); hit = 1; }
    return hit;
}

/* Handles of streams destroyed (cuStreamDestroy): a real driver reads freed memory through one (undefined:
   on an H200, cuStreamIsCapturing of a stream CuPy had destroyed crashed the process). Counted and refused. */
#define NDEAD NSTREAMS
static uintptr_t dead[NDEAD];
static int ndead;
static int is_dead(CUstream h) {
    uintptr_t v = (uintptr_t)h;
    for (int i = 0; i < ndead; i++)
        if (dead[i] == v) return 1;
    return 0;
}

/* The stream a call names (the legacy stream: the current context's), or INVALID_HANDLE (the table is full,
   or the stream was destroyed). */
static CUresult named_stream(int entry, CUstream h, int *si) {
    if (!is_legacy(h) && is_dead(h)) { emu_count[C_DEAD_STREAMS]++; *si = -1; return refuse(entry, INVALID_HANDLE); }
    *si = stream_index(h);
    return *si < 0 ? refuse(entry, INVALID_HANDLE) : OK;
}
/* The stream a call works on: not the legacy stream while it is implicit (CAPTURE_IMPLICIT, that capture
   invalidated); where the work may be captured, not a stream whose capture is invalidated. */
static CUresult working_stream(int entry, CUstream h, int *si, int capturable) {
    CHECK(named_stream(entry, h, si))
    if (implicit(*si)) return refuse(entry, CAPTURE_IMPLICIT);
    if (capturable && streams[*si].status == STATUS_INVALIDATED) return refuse(entry, CAPTURE_INVALIDATED);
    return OK;
}
/* The legacy stream's calls need a current context (a stream made by cuStreamCreate names its own). */
static CUresult legacy_context(int entry, CUstream h) { return is_legacy(h) ? need_context(entry) : OK; }

static void complete(stream_t *s, unsigned long long upto) { if (s->done < upto) s->done = upto; }
static void finish(stream_t *s) { complete(s, s->queued); }
/* A query of the work up to `upto`: NOT_READY (counted) until it is done; with progress on, done after. */
static CUresult poll(stream_t *s, unsigned long long upto) {
    if (s->done >= upto) return OK;
    emu_count[C_NOT_READY]++;
    if (emu_progress) complete(s, upto);
    return NOT_READY;
}

/* ------------------------------------------------------------------ init, devices, contexts */
static CUresult e_cuInit(unsigned int Flags) {
    ENTER(cuInit)
    if (Flags != 0) return refuse(I_cuInit, INVALID_VALUE);
    initialized = 1;
    return OK;
}
static CUresult e_cuDriverGetVersion(int* driverVersion) {
    ENTER(cuDriverGetVersion)
    if (!driverVersion) return refuse(I_cuDriverGetVersion, INVALID_VALUE);
    *driverVersion = 13000;
    return OK;
}
static CUresult e_cuDeviceGet(CUdevice* device, int ordinal) {
    ENTER_OUT(cuDeviceGet, device)
    CHECK(device_ok(I_cuDeviceGet, ordinal))
    *device = ordinal;
    return OK;
}
static CUresult e_cuDeviceGetCount(int* count) {
    ENTER_OUT(cuDeviceGetCount, count)
    *count = emu_devices;
    return OK;
}
/* device 0 and 1: sm_90 with 132 multiprocessors (an H100); attributes are 1..150 */
static CUresult e_cuDeviceGetAttribute(int* pi, CUdevice_attribute attrib, CUdevice dev) {
    ENTER_OUT(cuDeviceGetAttribute, pi)
    CHECK(device_ok(I_cuDeviceGetAttribute, dev))
    if (attrib < 1 || attrib > 150) return refuse(I_cuDeviceGetAttribute, INVALID_VALUE);
    *pi = attrib == 75 ? 9 : attrib == 76 ? 0 : attrib == 16 ? 132 : attrib == 1 ? 1024 : 1;
    return OK;
}
static CUresult e_cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice dev) {
    ENTER_OUT(cuDevicePrimaryCtxRetain, pctx)
    CHECK(device_ok(I_cuDevicePrimaryCtxRetain, dev))
    *pctx = PRIMARY(dev);
    return OK;
}
static CUresult e_cuCtxGetCurrent(CUcontext* pctx) {
    ENTER_OUT(cuCtxGetCurrent, pctx)
    *pctx = cur();
    return OK;
}
static CUresult e_cuCtxSetCurrent(CUcontext ctx) {
    ENTER(cuCtxSetCurrent)
    NEED_INIT()
    if (!ctx) { if (depth) depth--; return OK; }
    if (!context_ok(ctx)) return refuse(I_cuCtxSetCurrent, INVALID_CONTEXT);
    if (depth) stack[depth - 1] = ctx; else stack[depth++] = ctx;
    return OK;
}
static CUresult e_cuCtxPushCurrent(CUcontext ctx) {
    ENTER(cuCtxPushCurrent)
    NEED_INIT()
    if (!context_ok(ctx) || depth == 64) return refuse(I_cuCtxPushCurrent, INVALID_CONTEXT);
    stack[depth++] = ctx;
    return OK;
}
static CUresult e_cuCtxPopCurrent(CUcontext* pctx) {
    ENTER(cuCtxPopCurrent)
    if (pctx) *pctx = 0;
    NEED_INIT()
    if (!depth) return refuse(I_cuCtxPopCurrent, INVALID_CONTEXT);
    depth--;
    if (pctx) *pctx = stack[depth];
    return OK;
}
static CUresult e_cuCtxSynchronize(void) {
    ENTER(cuCtxSynchronize)
    NEED_INIT()
    CHECK(need_context(I_cuCtxSynchronize))
    int hit = 0;                                                   /* it would wait for a capturing stream */
    for (int i = 0; i < nstreams; i++)
        if (streams[i].status != STATUS_NONE && streams[i].ctx == cur()) { invalidate(&streams[i]); hit = 1; }
    if (hit) { emu_count[C_REFUSED_IN_CAPTURE]++; return refuse(I_cuCtxSynchronize, CAPTURE_UNSUPPORTED); }
    for (int i = 0; i < nstreams; i++) if (streams[i].ctx == cur()) finish(&streams[i]);
    emu_count[C_HOST_WAITS]++;
    return OK;
}

/* ------------------------------------------------------------------ memory */
/* The block of `pool` that starts at `p` (exact), or holds [p, p + len); -1 where none does. */
static int find_block(const pool_t *pool, uintptr_t p, size_t len, int exact) {
    const block_t *b = pool->b;
    for (int i = pool->n - 1; i >= 0; i--)
        if (exact ? b[i].ptr == p : (p >= b[i].ptr && p + len <= b[i].ptr + b[i].size)) return i;
    return -1;
}
/* A block of `bytes` recorded in `pool` (OUT_OF_MEMORY where there is none). */
static CUresult alloc_block(int entry, pool_t *pool, size_t bytes, unsigned flags, void **out) {
    void *m = malloc(bytes);
    if (!m) return refuse(entry, OUT_OF_MEMORY);
    pool->b = grow(pool->b, &pool->cap, pool->n + 1, sizeof(block_t));
    pool->b[pool->n++] = (block_t){(uintptr_t)m, bytes, flags, -1, 0};
    *out = m;
    return OK;
}
/* The block a free names: one of `pool`'s, by its start (INVALID_VALUE where none is). */
static CUresult freed_block(int entry, const pool_t *pool, uintptr_t p, int *i) {
    *i = find_block(pool, p, 0, 1);
    return *i < 0 ? refuse(entry, INVALID_VALUE) : OK;
}
static void drop_block(pool_t *pool, int i) { free((void *)pool->b[i].ptr); pool->b[i] = pool->b[--pool->n]; }

static CUresult e_cuMemAlloc(CUdeviceptr* dptr, size_t bytesize) {
    ENTER_OUT(cuMemAlloc, dptr)
    CHECK(need_context(I_cuMemAlloc))
    UNSAFE(cuMemAlloc)
    if (!bytesize) return refuse(I_cuMemAlloc, INVALID_VALUE);
    void *m;
    CHECK(alloc_block(I_cuMemAlloc, &device_pool, bytesize, 0, &m))
    emu_count[C_DEVICE_ALLOCS]++;
    *dptr = (CUdeviceptr)(uintptr_t)m;
    return OK;
}
static CUresult e_cuMemFree(CUdeviceptr dptr) {
    ENTER(cuMemFree)
    NEED_INIT()
    CHECK(need_context(I_cuMemFree))
    UNSAFE(cuMemFree)
    int i;
    CHECK(freed_block(I_cuMemFree, &device_pool, (uintptr_t)dptr, &i))
    drop_block(&device_pool, i);
    emu_count[C_DEVICE_FREES]++;
    return OK;
}
static CUresult e_cuMemHostAlloc(void** pp, size_t bytesize, unsigned int Flags) {
    ENTER_OUT(cuMemHostAlloc, pp)
    CHECK(need_context(I_cuMemHostAlloc))
    UNSAFE(cuMemHostAlloc)
    if (!bytesize || (Flags & ~7u)) return refuse(I_cuMemHostAlloc, INVALID_VALUE);
    void *m;
    CHECK(alloc_block(I_cuMemHostAlloc, &host_pool, bytesize, Flags, &m))
    emu_last_flags[2] = Flags;
    emu_count[C_HOST_ALLOCS]++;
    *pp = m;
    return OK;
}
static CUresult e_cuMemFreeHost(void* p) {
    ENTER(cuMemFreeHost)
    NEED_INIT()
    CHECK(need_context(I_cuMemFreeHost))
    UNSAFE(cuMemFreeHost)
    int i;
    CHECK(freed_block(I_cuMemFreeHost, &host_pool, (uintptr_t)p, &i))
    block_t *b = &host_pool.b[i];
    if (b->stream >= 0 && streams[b->stream].done < b->seq) {   /* a copy from it not done: the driver waits */
        emu_count[C_UNFINISHED_FREES]++;
        complete(&streams[b->stream], b->seq);
    }
    drop_block(&host_pool, i);
    emu_count[C_HOST_FREES]++;
    return OK;
}
/* What a copy checks first: a current context; the device range lies in one allocation; the stream (a copy to
   the device may be captured, one to the host is not; a synchronous copy is on the legacy stream, refused while a
   blocking stream of its context captures, as the driver refused it, whatever the capture modes). */
static CUresult copy_checks(int entry, CUdeviceptr device, size_t n, CUstream h, int to_device, int *si) {
    NEED_INIT()
    CHECK(need_context(entry))
    if (find_block(&device_pool, (uintptr_t)device, n, 0) < 0) return refuse(entry, INVALID_VALUE);
    return working_stream(entry, h, si, to_device);
}
static CUresult copy_to_device(int entry, CUdeviceptr dst, const void* src, size_t n, CUstream h, int async) {
    int si;
    CHECK(copy_checks(entry, dst, n, h, 1, &si))
    stream_t *s = &streams[si];
    memcpy((void *)(uintptr_t)dst, src, n);
    if (s->status == STATUS_ACTIVE) return OK;                   /* a copy node of the capture */
    s->queued++;
    int b = find_block(&host_pool, (uintptr_t)src, n, 0);
    if (b >= 0) { host_pool.b[b].stream = si; host_pool.b[b].seq = s->queued; }
    if (!async) finish(s);
    emu_count[async ? C_ASYNC_COPIES : C_SYNC_COPIES]++;
    return OK;
}
static CUresult e_cuMemcpyHtoD(CUdeviceptr dstDevice, const void* srcHost, size_t ByteCount) {
    ENTER(cuMemcpyHtoD)
    return copy_to_device(I_cuMemcpyHtoD, dstDevice, srcHost, ByteCount, 0, 0);
}
static CUresult e_cuMemcpyHtoDAsync(CUdeviceptr dstDevice, const void* srcHost, size_t ByteCount, CUstream hStream) {
    ENTER(cuMemcpyHtoDAsync)
    return copy_to_device(I_cuMemcpyHtoDAsync, dstDevice, srcHost, ByteCount, hStream, 1);
}
static CUresult copy_to_host(int entry, void* dst, CUdeviceptr src, size_t n, CUstream h, int async) {
    int si;
    CHECK(copy_checks(entry, src, n, h, 0, &si))
    memcpy(dst, (const void *)(uintptr_t)src, n);
    if (!async) { finish(&streams[si]); emu_count[C_HOST_WAITS]++; }
    emu_count[async ? C_ASYNC_COPIES : C_SYNC_COPIES]++;
    return OK;
}
static CUresult e_cuMemcpyDtoH(void* dstHost, CUdeviceptr srcDevice, size_t ByteCount) {
    ENTER(cuMemcpyDtoH)
    return copy_to_host(I_cuMemcpyDtoH, dstHost, srcDevice, ByteCount, 0, 0);
}
static CUresult e_cuMemcpyDtoHAsync(void* dstHost, CUdeviceptr srcDevice, size_t ByteCount, CUstream hStream) {
    ENTER(cuMemcpyDtoHAsync)
    return copy_to_host(I_cuMemcpyDtoHAsync, dstHost, srcDevice, ByteCount, hStream, 1);
}

/* ------------------------------------------------------------------ streams */
static CUresult e_cuStreamCreate(CUstream* phStream, unsigned int Flags) {
    ENTER_OUT(cuStreamCreate, phStream)
    CHECK(need_context(I_cuStreamCreate))
    if (Flags & ~1u) return refuse(I_cuStreamCreate, INVALID_VALUE);
    if (nstreams == NSTREAMS) return refuse(I_cuStreamCreate, OUT_OF_MEMORY);
    stream_t *s = &streams[nstreams];
    memset(s, 0, sizeof *s);
    s->handle = HANDLE(uintptr_t, SBASE, nstreams); s->ctx = cur(); s->blocking = !(Flags & 1); s->made = 1;
    s->flags = Flags;
    nstreams++;
    emu_last_flags[0] = Flags;
    emu_count[C_STREAMS]++;
    *phStream = (CUstream)s->handle;
    return OK;
}
static CUresult e_cuStreamDestroy(CUstream hStream) {
    ENTER(cuStreamDestroy)
    NEED_INIT()
    uintptr_t v = (uintptr_t)hStream;
    for (int i = 0; i < nstreams; i++)
        if (streams[i].made && streams[i].handle == v) {
            streams[i].made = 0; streams[i].handle = 1;
            if (ndead < NDEAD) dead[ndead++] = v;     /* never full: at most NSTREAMS streams are made */
            return OK;
        }
    if (is_dead(hStream)) emu_count[C_DEAD_STREAMS]++;
    return refuse(I_cuStreamDestroy, INVALID_HANDLE);
}
static CUresult e_cuStreamSynchronize(CUstream hStream) {
    ENTER(cuStreamSynchronize)
    NEED_INIT()
    CHECK(legacy_context(I_cuStreamSynchronize, hStream))
    UNSAFE(cuStreamSynchronize)
    int si;
    CHECK(working_stream(I_cuStreamSynchronize, hStream, &si, 0))
    finish(&streams[si]);
    emu_count[C_HOST_WAITS]++;
    return OK;
}
static CUresult e_cuStreamQuery(CUstream hStream) {
    ENTER(cuStreamQuery)
    NEED_INIT()
    UNSAFE(cuStreamQuery)
    int si;
    CHECK(named_stream(I_cuStreamQuery, hStream, &si))
    return poll(&streams[si], streams[si].queued);
}
static CUresult e_cuStreamIsCapturing(CUstream hStream, CUstreamCaptureStatus* captureStatus) {
    ENTER_OUT(cuStreamIsCapturing, captureStatus)                   /* STATUS_NONE */
    if (is_legacy(hStream)) {
        CHECK(need_context(I_cuStreamIsCapturing))
        CUcontext ctx = cur();                          /* the legacy stream's: no table entry is needed */
        for (int i = 0; active_captures && i < nstreams; i++)
            if (blocks_legacy(&streams[i], ctx)) return CAPTURE_IMPLICIT;    /* not an invalidation */
        return OK;
    }
    int si;
    CHECK(named_stream(I_cuStreamIsCapturing, hStream, &si))
    *captureStatus = streams[si].status;
    return OK;
}
static CUresult e_cuStreamBeginCapture(CUstream hStream, CUstreamCaptureMode mode) {
    ENTER(cuStreamBeginCapture)
    NEED_INIT()
    if (is_legacy(hStream)) return refuse(I_cuStreamBeginCapture, CAPTURE_UNSUPPORTED);
    if (mode < MODE_GLOBAL || mode > MODE_RELAXED) return refuse(I_cuStreamBeginCapture, INVALID_VALUE);
    int si;
    CHECK(named_stream(I_cuStreamBeginCapture, hStream, &si))
    stream_t *s = &streams[si];
    if (s->status != STATUS_NONE) return refuse(I_cuStreamBeginCapture, ILLEGAL_STATE);
    captures = grow(captures, &cap_captures, ncaptures + 1, sizeof(capture_t));
    memset(&captures[ncaptures], 0, sizeof(capture_t));
    s->capture = ++ncaptures;                                      /* ids from 1 */
    s->status = STATUS_ACTIVE; s->mode = mode; s->thread = ME;
    active_captures++;
    return OK;
}
static CUresult e_cuStreamEndCapture(CUstream hStream, CUgraph* phGraph) {
    ENTER_OUT(cuStreamEndCapture, phGraph)
    int si;
    CHECK(named_stream(I_cuStreamEndCapture, hStream, &si))
    stream_t *s = &streams[si];
    if (s->status == STATUS_NONE) return refuse(I_cuStreamEndCapture, ILLEGAL_STATE);
    if (s->mode != MODE_RELAXED && s->thread != ME) return refuse(I_cuStreamEndCapture, CAPTURE_WRONG_THREAD);
    int invalidated = s->status == STATUS_INVALIDATED, id = s->capture;
    s->status = STATUS_NONE; s->capture = 0; s->thread = 0;
    active_captures--;
    captures[id - 1].ended = 1;
    if (invalidated) return refuse(I_cuStreamEndCapture, CAPTURE_INVALIDATED);
    *phGraph = HANDLE(CUgraph, GBASE, id - 1);
    return OK;
}
static CUresult e_cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode* mode) {
    ENTER(cuThreadExchangeStreamCaptureMode)
    if (*mode < MODE_GLOBAL || *mode > MODE_RELAXED) return refuse(I_cuThreadExchangeStreamCaptureMode, INVALID_VALUE);
    int old = thread_mode;
    thread_mode = *mode;
    *mode = old;
    return OK;
}

/* ------------------------------------------------------------------ events */
static int event_index(CUevent h) {
    int i = INDEX(h, EBASE, nevents);
    return i >= 0 && events[i].alive ? i : -1;
}
/* The live event a call names, or INVALID_HANDLE. */
static CUresult named_event(int entry, CUevent h, int *i) {
    *i = event_index(h);
    return *i < 0 ? refuse(entry, INVALID_HANDLE) : OK;
}
/* An event waited on: not one recorded in a capture (CAPTURED_EVENT). */
static CUresult waited_event(int entry, CUevent h, event_t **ev) {
    int i;
    CHECK(named_event(entry, h, &i))
    *ev = &events[i];
    return (*ev)->captured ? refuse(entry, CAPTURED_EVENT) : OK;
}
static CUresult e_cuEventCreate(CUevent* phEvent, unsigned int Flags) {
    ENTER_OUT(cuEventCreate, phEvent)
    CHECK(need_context(I_cuEventCreate))
    if ((Flags & ~7u) || ((Flags & 4) && !(Flags & 2))) return refuse(I_cuEventCreate, INVALID_VALUE);
    if (nevents == NEVENTS) return refuse(I_cuEventCreate, OUT_OF_MEMORY);
    events[nevents] = (event_t){1, -1, 0, 0, Flags, cur(), 0};
    emu_last_flags[1] = Flags;
    emu_count[C_EVENTS]++;
    *phEvent = HANDLE(CUevent, EBASE, nevents++);
    return OK;
}
static CUresult e_cuEventDestroy(CUevent hEvent) {
    ENTER(cuEventDestroy)
    NEED_INIT()
    CHECK(need_context(I_cuEventDestroy))
    int i;
    CHECK(named_event(I_cuEventDestroy, hEvent, &i))
    events[i].alive = 0;
    emu_count[C_EVENTS_DESTROYED]++;
    return OK;
}
static CUresult e_cuEventRecord(CUevent hEvent, CUstream hStream) {
    ENTER(cuEventRecord)
    NEED_INIT()
    CHECK(legacy_context(I_cuEventRecord, hStream))
    int i, si;
    CHECK(named_event(I_cuEventRecord, hEvent, &i))
    CHECK(working_stream(I_cuEventRecord, hStream, &si, 1))
    stream_t *s = &streams[si];
    event_t *ev = &events[i];
    ev->stream = si; ev->captured = s->status == STATUS_ACTIVE; ev->target = s->queued; ev->told = 0;
    return OK;
}
static CUresult e_cuEventQuery(CUevent hEvent) {
    ENTER(cuEventQuery)
    NEED_INIT()
    UNSAFE(cuEventQuery)
    event_t *ev;
    CHECK(waited_event(I_cuEventQuery, hEvent, &ev))
    return ev->stream < 0 ? OK : poll(&streams[ev->stream], ev->target);
}
static CUresult e_cuEventSynchronize(CUevent hEvent) {
    ENTER(cuEventSynchronize)
    NEED_INIT()
    UNSAFE(cuEventSynchronize)
    event_t *ev;
    CHECK(waited_event(I_cuEventSynchronize, hEvent, &ev))
    if (ev->stream >= 0) complete(&streams[ev->stream], ev->target);
    emu_count[C_HOST_WAITS]++;
    return OK;
}

/* ------------------------------------------------------------------ images: each kernel's parameter layout */
static int add_kernel(const char *name, size_t len, int lib) {
    kernels = grow(kernels, &cap_kernels, nkernels + 1, sizeof(kernel_t));
    kernel_t *k = &kernels[nkernels];
    memset(k, 0, sizeof *k);
    k->name = strndup(name, len); k->lib = lib;
    k->offset = calloc(512, sizeof(unsigned short)); k->size = calloc(512, sizeof(unsigned short));
    return nkernels++;
}
static void add_param(kernel_t *k, unsigned ordinal, unsigned offset, unsigned size) {
    if (ordinal >= 512) return;
    k->offset[ordinal] = offset; k->size[ordinal] = size;
    if ((int)ordinal + 1 > k->nparams) k->nparams = ordinal + 1;
}
static uint16_t u16(const unsigned char *p) { return p[0] | p[1] << 8; }
static uint32_t u32(const unsigned char *p) { return u16(p) | (uint32_t)u16(p + 2) << 16; }
static uint64_t u64(const unsigned char *p) { return u32(p) | (uint64_t)u32(p + 4) << 32; }

/* A cubin (64-bit ELF): every ".nv.info.<kernel>" section's EIATTR list: KPARAM_INFO (0x17: ordinal, offset,
   size in bits 18..31), PARAM_CBANK (0x0a: the bank's size in the high half), MAX_THREADS (0x05) and REQNTID
   (0x10): the block's limit. */
static int parse_cubin(const unsigned char *elf, int lib) {
    if (elf[4] != 2 || elf[5] != 1) return -1;
    uint64_t shoff = u64(elf + 0x28);
    unsigned entsize = u16(elf + 0x3A), shnum = u16(elf + 0x3C), shstrndx = u16(elf + 0x3E);
    if (!shoff || entsize < 64 || shstrndx >= shnum) return -1;
    const unsigned char *strs = elf + u64(elf + shoff + shstrndx * entsize + 24);
    int found = 0;
    for (unsigned s = 0; s < shnum; s++) {
        const unsigned char *sh = elf + shoff + s * entsize;
        const char *name = (const char *)strs + u32(sh);
        if (strncmp(name, ".nv.info.", 9) != 0) continue;
        const unsigned char *info = elf + u64(sh + 24);
        uint64_t size = u64(sh + 32), i = 0;
        int ki = add_kernel(name + 9, strlen(name + 9), lib);     /* may move the table: index it after */
        kernel_t *k = &kernels[ki];
        found++;
        while (i + 4 <= size) {
            unsigned fmt = info[i], attr = info[i + 1];
            i += 2;
            if (fmt == 4) {
                unsigned n = u16(info + i);
                const unsigned char *d = info + i + 2;
                i += 2 + n;
                if (attr == 0x17 && n >= 12) add_param(k, u16(d + 4), u16(d + 6), (u32(d + 8) >> 18) & 0x3FFF);
                else if (attr == 0x0A && n >= 8) k->cbank = u16(d + 6);
                else if ((attr == 0x05 || attr == 0x10) && n >= 12) k->max_threads = u32(d) * u32(d + 4) * u32(d + 8);
            } else if (fmt >= 1 && fmt <= 3) {
                i += 2;
            } else {
                return -1;
            }
        }
    }
    return found;
}

/* PTX: each ".entry NAME(" and its ".param .TYPEbits NAME" list, laid out at their natural alignment. */
static int parse_ptx(const char *ptx, int lib) {
    int found = 0;
    const char *p = ptx;
    while ((p = strstr(p, ".entry ")) != NULL) {
        p += 7;
        const char *open = strchr(p, '(');
        if (!open) return -1;
        const char *end = open;
        while (end > p && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n')) end--;
        int ki = add_kernel(p, end - p, lib);
        kernel_t *k = &kernels[ki];
        found++;
        const char *close = strchr(open, ')');
        if (!close) return -1;
        unsigned offset = 0, ordinal = 0;
        for (const char *q = open; (q = strstr(q, ".param")) != NULL && q < close; q += 6) {
            const char *t = q + 6;
            while (*t == ' ' || *t == '\t') t++;
            unsigned bits = 0;
            if (*t == '.') { t++; while (*t >= 'a' && *t <= 'z') t++; bits = (unsigned)strtoul(t, NULL, 10); }
            unsigned size = bits / 8 ? bits / 8 : 1;
            offset = (offset + size - 1) / size * size;
            add_param(k, ordinal++, offset, size);
            offset += size;
        }
        k->cbank = offset;
        const char *limit = strstr(close, ".maxntid");
        const char *body = strchr(close, '{');
        if (limit && body && limit < body) {
            unsigned x = 1, y = 1, z = 1;
            sscanf(limit + 8, " %u , %u , %u", &x, &y, &z);
            k->max_threads = x * y * z;
        }
        p = close;
    }
    return found;
}

static CUresult e_cuLibraryLoadData(CUlibrary* library, const void* code, CUjit_option* jitOptions,
                                    void** jitOptionsValues, unsigned int numJitOptions,
                                    CUlibraryOption* libraryOptions, void** libraryOptionValues,
                                    unsigned int numLibraryOptions) {
    ENTER_OUT(cuLibraryLoadData, library)
    (void)jitOptions; (void)jitOptionsValues; (void)libraryOptions; (void)libraryOptionValues;
    if (!code || (numJitOptions && !jitOptions) || (numLibraryOptions && !libraryOptions))
        return refuse(I_cuLibraryLoadData, INVALID_VALUE);
    const unsigned char *c = code;
    int lib = nlibs, before = nkernels, got;
    if (c[0] == 0x7F && c[1] == 'E' && c[2] == 'L' && c[3] == 'F') got = parse_cubin(c, lib);
    else if (strstr((const char *)c, ".entry ") && strstr((const char *)c, ".version")) got = parse_ptx((const char *)c, lib);
    else got = -1;
    if (got <= 0) { nkernels = before; return refuse(I_cuLibraryLoadData, INVALID_IMAGE); }
    for (int k = before; k < nkernels; k++) {                      /* the bank covers every parameter */
        kernel_t *kk = &kernels[k];
        unsigned sum = 0, end = 0;
        for (int i = 0; i < kk->nparams; i++) {
            sum += kk->size[i];
            if (kk->offset[i] + kk->size[i] > end) end = kk->offset[i] + kk->size[i];
        }
        if (end > kk->cbank) kk->cbank = end;
        (void)sum;
        unsigned at = 0;                                           /* the gaps, in order of offset */
        for (;;) {
            unsigned next = kk->cbank, found = 0;
            for (int i = 0; i < kk->nparams; i++)
                if (kk->offset[i] >= at && kk->offset[i] <= next) { next = kk->offset[i]; found = 1; }
            if (next > at && kk->ngaps < 32) { kk->gaps[kk->ngaps][0] = at; kk->gaps[kk->ngaps++][1] = next - at; }
            if (!found) break;
            unsigned size = 0;
            for (int i = 0; i < kk->nparams; i++) if (kk->offset[i] == next && kk->size[i] > size) size = kk->size[i];
            at = next + (size ? size : 1);
        }
    }
    nlibs++;
    emu_count[C_LOADS]++;
    *library = HANDLE(CUlibrary, LBASE, lib);
    return OK;
}
static CUresult e_cuLibraryUnload(CUlibrary library) {
    ENTER(cuLibraryUnload)
    NEED_INIT()
    if (INDEX(library, LBASE, nlibs) < 0) return refuse(I_cuLibraryUnload, INVALID_HANDLE);
    return OK;
}
static CUresult e_cuLibraryGetKernel(CUkernel* pKernel, CUlibrary library, const char* name) {
    ENTER_OUT(cuLibraryGetKernel, pKernel)
    int lib = INDEX(library, LBASE, nlibs);
    if (lib < 0) return refuse(I_cuLibraryGetKernel, INVALID_HANDLE);
    if (!name) return refuse(I_cuLibraryGetKernel, INVALID_VALUE);
    for (int k = 0; k < nkernels; k++)
        if (kernels[k].lib == lib && strcmp(kernels[k].name, name) == 0) {
            *pKernel = HANDLE(CUkernel, KBASE, k);
            return OK;
        }
    return refuse(I_cuLibraryGetKernel, NOT_FOUND);
}
static CUresult e_cuKernelGetFunction(CUfunction* pFunc, CUkernel kernel) {
    ENTER_OUT(cuKernelGetFunction, pFunc)
    CHECK(need_context(I_cuKernelGetFunction))
    int k = INDEX(kernel, KBASE, nkernels);
    if (k < 0) return refuse(I_cuKernelGetFunction, INVALID_HANDLE);
    for (int f = 0; f < nfunctions; f++)
        if (functions[f].kernel == k && functions[f].ctx == cur()) {
            *pFunc = HANDLE(CUfunction, FBASE, f);
            return OK;
        }
    functions = grow(functions, &cap_functions, nfunctions + 1, sizeof(function_t));
    functions[nfunctions] = (function_t){k, cur()};
    *pFunc = HANDLE(CUfunction, FBASE, nfunctions++);
    return OK;
}

/* ------------------------------------------------------------------ launches */
/* Each parameter copied from its own address to its offset in the bank, as the driver gathers them; 1 where each
   address lay at its offset from the first (fastema's one buffer: then the bank is one copy from there, the same
   bytes at every parameter's place, the gaps zeroed after). */
static unsigned gather(unsigned char *__restrict to, void **__restrict from, const unsigned short *__restrict offs,
                       const unsigned short *__restrict sizes, int n, unsigned bank) {
    const unsigned char *base = (const unsigned char *)from[0] - offs[0];
    int i = 0;
    while (i < n && (const unsigned char *)from[i] == base + offs[i]) i++;
    if (i == n) {
        memcpy(to, base, bank);
        return 1;
    }
    for (i = 0; i < n; i++) {
        const unsigned char *src = from[i];
        for (unsigned b = 0; b < sizes[i]; b++) to[offs[i] + b] = src[b];
    }
    return 0;
}
static void put(const emu_launch *r) {
    emu_launch *to = &emu_launches[emu_launch_seq % RING];
    *to = *r;
    to->seq = ++emu_launch_seq;
}
static CUresult bad_launch(CUresult r) { emu_count[C_BAD_LAUNCHES]++; return refuse(I_cuLaunchKernel, r); }
static CUresult e_cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                                 unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
                                 unsigned int sharedMemBytes, CUstream hStream, void** kernelParams, void** extra) {
    ENTER(cuLaunchKernel)
    NEED_INIT()
    CUresult e = need_context(I_cuLaunchKernel);
    if (e) { emu_count[C_BAD_LAUNCHES]++; return e; }
    int k = -1, fi = INDEX(f, FBASE, nfunctions);
    if (fi >= 0) {
        if (functions[fi].ctx != cur()) return bad_launch(INVALID_HANDLE);
        k = functions[fi].kernel;
    } else {
        k = INDEX(f, KBASE, nkernels);                             /* a CUkernel: loaded at its launch */
    }
    kernel_t *kk = k >= 0 ? &kernels[k] : NULL;
    unsigned long long threads = (unsigned long long)blockDimX * blockDimY * blockDimZ;
    CUresult bad = !kk ? INVALID_HANDLE
        : (!gridDimX || !gridDimY || !gridDimZ || gridDimX > 0x7FFFFFFFu || gridDimY > 65535 || gridDimZ > 65535
           || !threads || blockDimX > 1024 || blockDimY > 1024 || blockDimZ > 64 || threads > 1024
           || (kk->max_threads && threads > kk->max_threads) || sharedMemBytes > 49152
           || (kernelParams && extra) || (!kernelParams && !extra && kk->nparams)) ? INVALID_VALUE : OK;
    if (bad) return bad_launch(bad);
    int si;
    e = working_stream(I_cuLaunchKernel, hStream, &si, 1);
    if (e) { if (e == INVALID_HANDLE) emu_count[C_BAD_LAUNCHES]++; return e; }    /* a capture's refusal: not counted */
    stream_t *s = &streams[si];
    emu_launch *r = &emu_launches[emu_launch_seq % RING];          /* written in place, counted once whole */
    r->func = (uintptr_t)f; r->kernel = k; r->grid[0] = gridDimX; r->grid[1] = gridDimY; r->grid[2] = gridDimZ;
    r->block[0] = blockDimX; r->block[1] = blockDimY; r->block[2] = blockDimZ; r->shared = sharedMemBytes;
    r->nparams = kk->nparams; r->nbytes = kk->cbank; r->extra = extra != NULL; r->packed = 1; r->replay = 0;
    r->stream = s->handle; r->context = (uintptr_t)cur();
    r->captured = s->status == STATUS_ACTIVE ? s->capture : 0;
    unsigned limit = kk->cbank < PARAM_BYTES ? kk->cbank : PARAM_BYTES;
    if (kernelParams && kk->cbank <= PARAM_BYTES) {                /* as the driver reads them: by the layout */
        r->packed = gather(r->params, kernelParams, kk->offset, kk->size, kk->nparams, kk->cbank);
        for (int g = 0; g < kk->ngaps; g++)
            for (unsigned b = 0; b < kk->gaps[g][1]; b++) r->params[kk->gaps[g][0] + b] = 0;
    } else if (kernelParams) {                                     /* a bank over the record's room: not kept */
        r->packed = 0;
    } else if (extra) {                                            /* extra: BUFFER_POINTER, BUFFER_SIZE, END */
        void *buffer = NULL; size_t *size = NULL; int n = 0;
        for (; n < 16 && extra[n] != 0; n += 2) {
            if (extra[n] == (void *)1) buffer = extra[n + 1];
            else if (extra[n] == (void *)2) size = extra[n + 1];
            else break;
        }
        if (n >= 16 || extra[n] != 0 || !buffer || !size || *size != kk->cbank) return bad_launch(INVALID_VALUE);
        memcpy(r->params, buffer, limit);
    }
    r->seq = ++emu_launch_seq;
    if (r->captured) {
        capture_t *c = &captures[r->captured - 1];
        c->launches = grow(c->launches, &c->cap, c->n + 1, sizeof(emu_launch));
        c->launches[c->n++] = *r;
        emu_count[C_CAPTURED]++;
    } else {
        s->queued++;
        emu_count[C_LAUNCHES]++;
    }
    return OK;
}

/* ------------------------------------------------------------------ graphs: what a capture captured, replayed */
static CUresult e_cuGraphInstantiate(CUgraphExec* phGraphExec, CUgraph hGraph, unsigned long long flags) {
    ENTER_OUT(cuGraphInstantiate, phGraphExec)
    int g = INDEX(hGraph, GBASE, ncaptures);
    if (g < 0 || !captures[g].ended) return refuse(I_cuGraphInstantiate, INVALID_VALUE);
    if (flags & ~0xFull) return refuse(I_cuGraphInstantiate, INVALID_VALUE);
    execs = grow(execs, &cap_execs, nexecs + 1, sizeof(int));
    execs[nexecs] = g;
    *phGraphExec = HANDLE(CUgraphExec, XBASE, nexecs++);
    return OK;
}
static CUresult e_cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream) {
    ENTER(cuGraphLaunch)
    NEED_INIT()
    int x = INDEX(hGraphExec, XBASE, nexecs);
    if (x < 0 || execs[x] < 0) return refuse(I_cuGraphLaunch, INVALID_VALUE);
    CHECK(legacy_context(I_cuGraphLaunch, hStream))
    int si;
    CHECK(named_stream(I_cuGraphLaunch, hStream, &si))
    if (streams[si].status != STATUS_NONE) return refuse(I_cuGraphLaunch, NOT_SUPPORTED);
    capture_t *c = &captures[execs[x]];
    for (int i = 0; i < c->n; i++) {
        emu_launch r = c->launches[i];
        r.captured = 0; r.replay = x + 1; r.stream = streams[si].handle;
        put(&r);
        emu_count[C_REPLAYED]++;
    }
    streams[si].queued++;
    return OK;
}
static CUresult e_cuGraphDestroy(CUgraph hGraph) {
    ENTER(cuGraphDestroy)
    NEED_INIT()
    if (INDEX(hGraph, GBASE, ncaptures) < 0) return refuse(I_cuGraphDestroy, INVALID_VALUE);
    return OK;
}
static CUresult e_cuGraphExecDestroy(CUgraphExec hGraphExec) {
    ENTER(cuGraphExecDestroy)
    NEED_INIT()
    int x = INDEX(hGraphExec, XBASE, nexecs);
    if (x < 0 || execs[x] < 0) return refuse(I_cuGraphExecDestroy, INVALID_VALUE);
    execs[x] = -1;
    return OK;
}

/* ------------------------------------------------------------------ errors by name */
static const char *error_name(CUresult e) {
    switch (e) {
    case OK: return "CUDA_SUCCESS";
    case INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    case INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case ILLEGAL_STATE: return "CUDA_ERROR_ILLEGAL_STATE";
    case NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case NOT_READY: return "CUDA_ERROR_NOT_READY";
    case NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    case CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
    case CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
    case CAPTURE_IMPLICIT: return "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT";
    case CAPTURED_EVENT: return "CUDA_ERROR_CAPTURED_EVENT";
    case CAPTURE_WRONG_THREAD: return "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD";
    default: return NULL;
    }
}
static CUresult named_error(CUresult error, const char** pStr) {   /* the string too is the error's name */
    *pStr = error_name(error);
    return *pStr ? OK : INVALID_VALUE;
}
static CUresult e_cuGetErrorName(CUresult error, const char** pStr) {
    ENTER(cuGetErrorName)
    return named_error(error, pStr);
}
static CUresult e_cuGetErrorString(CUresult error, const char** pStr) {
    ENTER(cuGetErrorString)
    return named_error(error, pStr);
}

/* ------------------------------------------------------------------ entry points no fastema call should reach */
#define NUNKNOWN 1000
static const char *unknown_names[NUNKNOWN];
static int nunknown = 0;
long long emu_unknown_calls[NUNKNOWN];
const char *emu_unknown_name(int i) { return i >= 0 && i < nunknown ? unknown_names[i] : NULL; }
static CUresult unknown(int i) {
    if (forked) return forked_call();
    emu_count[C_UNKNOWN]++; emu_unknown_calls[i]++;
    return NOT_SUPPORTED;
}
#pragma GCC push_options
#pragma GCC optimize ("O0")                                    /* 1000 one-line functions: built fast */
#define U1(n) static CUresult u_##n(void) { return unknown(n - 100); }
#define U10(p) U1(p##0) U1(p##1) U1(p##2) U1(p##3) U1(p##4) U1(p##5) U1(p##6) U1(p##7) U1(p##8) U1(p##9)
#define U100(p) U10(p##0) U10(p##1) U10(p##2) U10(p##3) U10(p##4) U10(p##5) U10(p##6) U10(p##7) U10(p##8) U10(p##9)
U100(1) U100(2) U100(3) U100(4) U100(5) U100(6) U100(7) U100(8) U100(9) U100(10)
#define A1(n) (void *)u_##n,
#define A10(p) A1(p##0) A1(p##1) A1(p##2) A1(p##3) A1(p##4) A1(p##5) A1(p##6) A1(p##7) A1(p##8) A1(p##9)
#define A100(p) A10(p##0) A10(p##1) A10(p##2) A10(p##3) A10(p##4) A10(p##5) A10(p##6) A10(p##7) A10(p##8) A10(p##9)
static void *unknown_fns[] = { A100(1) A100(2) A100(3) A100(4) A100(5) A100(6) A100(7) A100(8) A100(9) A100(10) };
#pragma GCC pop_options

static void *entry(const char *symbol) {
#define LOOKUP(name) if (strcmp(symbol, #name) == 0) return (void *)e_##name;
    ENTRY_LIST(LOOKUP)
    if (strcmp(symbol, "cuGraphInstantiateWithFlags") == 0) return (void *)e_cuGraphInstantiate;
    for (int i = 0; i < nunknown; i++) if (strcmp(unknown_names[i], symbol) == 0) return unknown_fns[i];
    if (nunknown == NUNKNOWN) return NULL;
    unknown_names[nunknown] = strdup(symbol);
    return unknown_fns[nunknown++];
}
CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int cudaVersion, cuuint64_t flags,
                             CUdriverProcAddressQueryResult* symbolStatus) {
    (void)cudaVersion; (void)flags;
    *pfn = entry(symbol);
    if (symbolStatus) *symbolStatus = *pfn ? 0 : 1;
    return *pfn ? OK : NOT_FOUND;
}
CUresult cuGetProcAddress(const char* symbol, void** pfn, int cudaVersion, cuuint64_t flags) {
    return cuGetProcAddress_v2(symbol, pfn, cudaVersion, flags, NULL);
}
/* the names a program may find by dlsym, besides cuGetProcAddress */
CUresult cuInit(unsigned int Flags) { return e_cuInit(Flags); }
CUresult cuDriverGetVersion(int* driverVersion) { return e_cuDriverGetVersion(driverVersion); }

/* ------------------------------------------------------------------ controls (Python, through ctypes) */
__attribute__((constructor)) static void at_load(void) { pthread_atfork(NULL, NULL, child); }
int emu_depth(void) { return depth; }
unsigned long long emu_current(void) { return (uintptr_t)cur(); }
int emu_forked(void) { return forked; }
int emu_active_captures(void) { return active_captures; }
const char *emu_kernel_name(long long k) { return k >= 0 && k < nkernels ? kernels[k].name : NULL; }
int emu_kernel_layout(long long k, unsigned short *offsets, unsigned short *sizes, int room, unsigned *cbank) {
    if (k < 0 || k >= nkernels) return -1;
    for (int i = 0; i < kernels[k].nparams && i < room; i++) { offsets[i] = kernels[k].offset[i]; sizes[i] = kernels[k].size[i]; }
    *cbank = kernels[k].cbank;
    return kernels[k].nparams;
}
void emu_complete_all(void) {
    lock_it();
    for (int i = 0; i < nstreams; i++) finish(&streams[i]);
    release_it();
}
unsigned long long emu_pending(unsigned long long stream) {      /* work queued on it and not done */
    lock_it();
    unsigned long long n = 0;
    for (int i = 0; i < nstreams; i++)
        if (!streams[i].legacy && streams[i].handle == stream) n = streams[i].queued - streams[i].done;
    release_it();
    return n;
}
int emu_set_blocking(unsigned long long stream, int blocking) {  /* a stream torch made: blocking or not */
    lock_it();
    int si = stream_index((CUstream)(uintptr_t)stream);
    if (si >= 0) streams[si].blocking = blocking;
    release_it();
    return si;
}
int emu_unknown_count(void) { return nunknown; }
