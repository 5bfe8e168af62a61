/*
 * edgecc_model.h: the C API of an edgecc artifact (C99 and C++).
 *
 * One model = one compiled network + its weights. Typical use:
 *
 *     edgecc_model* m = NULL;
 *     if (edgecc_model_create("path/to/artifact", &m) != EDGECC_OK) {       // or edgecc_model_create_linked
 *         fprintf(stderr, "%s\n", edgecc_last_error());
 *     }
 *     edgecc_model_set_arena(m, arena, arena_bytes);                        // optional: no heap in run
 *     edgecc_model_set_input(m, 0, data, nbytes);                           // for every input (or bind_input)
 *     edgecc_model_run(m);
 *     edgecc_model_get_output(m, 0, buffer, nbytes);                        // for every output
 *     edgecc_model_destroy(m);
 *
 * Every function returns an edgecc_status; on anything but EDGECC_OK, edgecc_last_error() returns a
 * one-line message (valid until the next call of this API on the same thread). No function aborts or
 * throws on bad arguments: null pointers, out-of-range indices, wrong byte sizes, an artifact built for
 * another architecture and a corrupted params.bin (sha256 differs from the manifest) are all reported.
 *
 * A model is not thread-safe: use one model per thread (models may share nothing but read-only weights).
 */
#ifndef EDGECC_MODEL_H_
#define EDGECC_MODEL_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EDGECC_MODEL_API_VERSION 3  /* 2: caller-provided arena; 3: zero-copy inputs (bind_input) */

typedef enum edgecc_status {
  EDGECC_OK = 0,
  EDGECC_ERR_NULL_POINTER = 1,      /* a required pointer argument is NULL */
  EDGECC_ERR_INDEX = 2,             /* input/output index out of range */
  EDGECC_ERR_SIZE = 3,              /* byte size does not match the tensor's dtype and shape */
  EDGECC_ERR_IO = 4,                /* a file cannot be opened or read */
  EDGECC_ERR_FORMAT = 5,            /* manifest.json / params.bin / model.so malformed */
  EDGECC_ERR_HASH_MISMATCH = 6,     /* params.bin (or model.so) differs from the manifest's sha256 */
  EDGECC_ERR_TARGET_MISMATCH = 7,   /* the artifact was built for another architecture */
  EDGECC_ERR_NOT_LINKED = 8,        /* edgecc_model_create_linked without a model linked in */
  EDGECC_ERR_STATE = 9,             /* e.g. reading outputs before a successful run, unset inputs */
  EDGECC_ERR_RUNTIME = 10,          /* the TVM runtime reported an error while loading or running */
  EDGECC_ERR_OUT_OF_MEMORY = 11,
  EDGECC_ERR_ALIGNMENT = 12         /* a bound input's address is not aligned as the kernels need */
} edgecc_status;

typedef struct edgecc_model edgecc_model;

/* Description of one input or output tensor (pointers stay valid while the model lives). */
typedef struct edgecc_tensor_info {
  const char* name;      /* the ONNX name */
  const char* dtype;     /* "float32", "int64", "uint8", ... */
  size_t elem_bytes;     /* bytes of one element */
  size_t ndim;
  const int64_t* shape;  /* ndim dims, all concrete (as built) */
  size_t nbytes;         /* elem_bytes * product(shape) */
} edgecc_tensor_info;

/* Memory the model needs, from the build's memory plan (bytes). */
typedef struct edgecc_memory_info {
  uint64_t weights_bytes;    /* all weights (params.bin or linked in) */
  uint64_t arena_bytes;      /* planned activation storage of the entry function */
  uint64_t workspace_bytes;  /* largest kernel scratch (TVM workspace) */
  uint64_t io_bytes;         /* input + output buffers the model keeps */
} edgecc_memory_info;

/* Load an artifact directory: manifest.json, model.so (dynamically loaded) and params.bin.
 * Checks the artifact's architecture against this program's and params.bin's sha256. */
edgecc_status edgecc_model_create(const char* artifact_dir, edgecc_model** out);

/* Use the model linked into this program (libedgecc_model.a of an `--emit static` build).
 * params_path: NULL for weights linked in (`--embed-params`), else the artifact's params.bin
 * (its sha256 is checked against the one recorded at build time). */
edgecc_status edgecc_model_create_linked(const char* params_path, edgecc_model** out);

/* Release everything the model holds. NULL is allowed. */
void edgecc_model_destroy(edgecc_model* model);

/* Message of the last failed call on this thread ("" if none). Never NULL. */
const char* edgecc_last_error(void);

/* Symbolic name of a status ("EDGECC_ERR_SIZE"). Never NULL. */
const char* edgecc_status_name(edgecc_status status);

edgecc_status edgecc_model_num_inputs(const edgecc_model* model, size_t* count);
edgecc_status edgecc_model_num_outputs(const edgecc_model* model, size_t* count);
edgecc_status edgecc_model_input_info(const edgecc_model* model, size_t index, edgecc_tensor_info* info);
edgecc_status edgecc_model_output_info(const edgecc_model* model, size_t index, edgecc_tensor_info* info);
edgecc_status edgecc_model_memory(const edgecc_model* model, edgecc_memory_info* info);

/* Caller-provided arena (API version 2). Without one, the TVM runtime allocates a run's tensors from the
 * heap (its pooled allocator keeps them after the first run). With one, every tensor a run allocates
 * (activations, outputs, kernel workspace) comes from the caller's buffer and edgecc_model_run allocates no
 * tensor memory from the heap; the outputs of a run live in the arena until the next run.
 *
 * edgecc_model_arena_bytes: the size the arena must have, from the build's memory plan (manifest
 * deliverables.memory.arena_run_bytes: the entry function's storage blocks, each rounded to 64 bytes, plus the
 * largest kernel workspace, plus the previous run's outputs, which the VM holds until the next run returns;
 * plus 64 bytes to align an unaligned buffer). EDGECC_ERR_STATE when the artifact states no size (storage
 * sized at run time).
 *
 * edgecc_model_set_arena: use `buffer` (any alignment; `nbytes` >= edgecc_model_arena_bytes, else
 * EDGECC_ERR_SIZE) for the runs that follow; NULL and 0 go back to runtime allocation. The buffer must stay
 * valid until another set_arena or destroy. Drops the outputs of the last run. A run that needs more than
 * the buffer fails with EDGECC_ERR_OUT_OF_MEMORY. EDGECC_ERR_STATE when the TVM runtime in this process
 * looked up its CPU allocator before the first edgecc model was created (the arena works by standing in
 * for TVM's CPU DeviceAPI, which the runtime looks up once).
 * Allocations by TVM's worker threads (parallel kernels with scratch in the loop body) are not redirected.
 *
 * edgecc_model_arena_used: the most bytes of the arena in use at once since set_arena. */
edgecc_status edgecc_model_arena_bytes(const edgecc_model* model, size_t* bytes);
edgecc_status edgecc_model_set_arena(edgecc_model* model, void* buffer, size_t nbytes);
edgecc_status edgecc_model_arena_used(const edgecc_model* model, size_t* bytes);

/* Copy `nbytes` (must equal the input's nbytes) into the model's input buffer `index` (any alignment). */
edgecc_status edgecc_model_set_input(edgecc_model* model, size_t index, const void* data, size_t nbytes);

/* Zero-copy input (API version 3): the runs that follow read input `index` straight from `data`, until the
 * next set_input or bind_input of that index, or destroy; nothing is copied. `data` must stay valid, and
 * must not change while edgecc_model_run runs; the model never writes to it. `nbytes` must equal the
 * input's nbytes. Alignment: edgecc_model_input_alignment gives what the address must be a multiple of:
 * the element size for artifacts whose kernels load inputs at any element alignment (manifest
 * signature.input_alignment "element"), else 64 bytes; EDGECC_ERR_ALIGNMENT otherwise (set_input, which
 * copies, takes any address). */
edgecc_status edgecc_model_bind_input(edgecc_model* model, size_t index, const void* data, size_t nbytes);
edgecc_status edgecc_model_input_alignment(const edgecc_model* model, size_t index, size_t* bytes);

/* Run the model on the inputs set so far (all of them must have been set or bound once). */
edgecc_status edgecc_model_run(edgecc_model* model);

/* Copy output `index` of the last run into `data` (`nbytes` must equal the output's nbytes). */
edgecc_status edgecc_model_get_output(const edgecc_model* model, size_t index, void* data, size_t nbytes);

/* Zero-copy view of output `index` of the last run; valid until the next run or destroy. */
edgecc_status edgecc_model_output_data(const edgecc_model* model, size_t index, const void** data,
                                       size_t* nbytes);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* EDGECC_MODEL_H_ */
