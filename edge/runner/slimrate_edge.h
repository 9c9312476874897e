/* slimrate_edge.h: run an ExecuTorch program (.pte) from C or C++, without Python.
 *
 * One model = one loaded program and its "forward" method. Inputs and outputs are tensors with the static
 * dtype and shape recorded in the program; their data is raw, densely packed, row-major (C order), in the
 * machine's byte order. Every function reports failure by its return value (a status, or NULL); the message
 * of the last failure on the calling thread is slimrate_edge_last_error(). Nothing here aborts on bad input.
 *
 *   const char* err;
 *   slimrate_edge_model* m = slimrate_edge_load("model.pte", &err);
 *   if (!m) { fprintf(stderr, "%s\n", err); return 1; }
 *   const void* in[] = {tokens};  size_t in_bytes[] = {sizeof tokens};
 *   void* out[] = {logits};       size_t out_bytes[] = {sizeof logits};
 *   if (slimrate_edge_run(m, in, in_bytes, out, out_bytes) != SLIMRATE_EDGE_OK)
 *     fprintf(stderr, "%s\n", slimrate_edge_last_error());
 *   slimrate_edge_free(m);
 *
 * A model may be used by one thread at a time; different models may run on different threads.
 */
#ifndef SLIMRATE_EDGE_H
#define SLIMRATE_EDGE_H

#include <stddef.h>
#include <stdint.h>

/* The library is built with hidden visibility; only these functions are exported. */
#if defined(__GNUC__)
#define SLIMRATE_EDGE_API __attribute__((visibility("default")))
#else
#define SLIMRATE_EDGE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  SLIMRATE_EDGE_OK = 0,
  SLIMRATE_EDGE_INVALID_ARGUMENT = 1, /* a NULL pointer, an index out of range, a buffer of the wrong size */
  SLIMRATE_EDGE_LOAD_FAILED = 2,      /* the file is missing, unreadable, corrupt, truncated or unsupported */
  SLIMRATE_EDGE_RUN_FAILED = 3,       /* the program failed while executing (e.g. a kernel rejected an input) */
} slimrate_edge_status;

/* Element types: the values of ExecuTorch's ScalarType (and c10's), so a program's codes pass through. */
typedef enum {
  SLIMRATE_EDGE_UINT8 = 0,
  SLIMRATE_EDGE_INT8 = 1,
  SLIMRATE_EDGE_INT16 = 2,
  SLIMRATE_EDGE_INT32 = 3,
  SLIMRATE_EDGE_INT64 = 4,
  SLIMRATE_EDGE_FLOAT16 = 5,
  SLIMRATE_EDGE_FLOAT32 = 6,
  SLIMRATE_EDGE_FLOAT64 = 7,
  SLIMRATE_EDGE_BOOL = 11,
  SLIMRATE_EDGE_BFLOAT16 = 15,
} slimrate_edge_dtype;

#define SLIMRATE_EDGE_MAX_DIMS 16

/* One input or output tensor of the method. */
typedef struct {
  int dtype;                              /* a slimrate_edge_dtype value, or another ScalarType code */
  size_t ndim;                            /* number of dimensions, at most SLIMRATE_EDGE_MAX_DIMS */
  int64_t shape[SLIMRATE_EDGE_MAX_DIMS];  /* sizes, outermost first; shape[ndim..] are 0 */
  size_t nbytes;                          /* element size × product of shape */
} slimrate_edge_tensor_info;

typedef struct slimrate_edge_model slimrate_edge_model;

/* Loads the program at path and prepares its "forward" method. Returns NULL on failure, with *error (when
 * error is not NULL) set to the message, which stays valid until the next slimrate_edge call on this thread. */
SLIMRATE_EDGE_API slimrate_edge_model* slimrate_edge_load(const char* path, const char** error);

/* Releases the model; NULL is a no-op. */
SLIMRATE_EDGE_API void slimrate_edge_free(slimrate_edge_model* model);

SLIMRATE_EDGE_API size_t slimrate_edge_num_inputs(const slimrate_edge_model* model);
SLIMRATE_EDGE_API size_t slimrate_edge_num_outputs(const slimrate_edge_model* model);

/* Fills *info for input (or output) number index. */
SLIMRATE_EDGE_API slimrate_edge_status slimrate_edge_input_info(const slimrate_edge_model* model, size_t index,
                                                                slimrate_edge_tensor_info* info);
SLIMRATE_EDGE_API slimrate_edge_status slimrate_edge_output_info(const slimrate_edge_model* model, size_t index,
                                                                 slimrate_edge_tensor_info* info);

/* Runs forward once. inputs[i] points to input_nbytes[i] bytes of input i, outputs[j] to output_nbytes[j]
 * bytes that receive output j; every size must equal that tensor's info.nbytes. The inputs are only read. */
SLIMRATE_EDGE_API slimrate_edge_status slimrate_edge_run(slimrate_edge_model* model, const void* const* inputs,
                                                         const size_t* input_nbytes, void* const* outputs,
                                                         const size_t* output_nbytes);

/* Sets the number of threads of ExecuTorch's shared thread pool (used by XNNPACK and the optimized kernels)
 * for every model of the process. Call it while no model is running. */
SLIMRATE_EDGE_API slimrate_edge_status slimrate_edge_set_num_threads(unsigned num_threads);

/* "float32", "int64", ... for a dtype code; "unknown" for any other. */
SLIMRATE_EDGE_API const char* slimrate_edge_dtype_name(int dtype);

/* The message of the last call on this thread that failed; "" when none has. */
SLIMRATE_EDGE_API const char* slimrate_edge_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SLIMRATE_EDGE_H */
