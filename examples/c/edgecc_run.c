/*
 * edgecc_run: run an edgecc model through the C API (edgecc_model.h), with inputs and outputs as raw files.
 *
 *   edgecc_run [--arena] ARTIFACT_DIR INPUTS.bin OUTPUTS.bin [REPEAT]          model.so + params.bin
 *   edgecc_run [--arena] --linked PARAMS.bin|- INPUTS.bin OUTPUTS.bin [REPEAT] model linked in (--emit static);
 *                                                                              '-': weights linked in
 *
 * --arena: allocate the arena once (edgecc_model_arena_bytes) and hand it to the model
 * (edgecc_model_set_arena): the runs then take no tensor memory from the heap.
 *
 * INPUTS.bin is every input's bytes, in signature order, back to back (little-endian, C order); OUTPUTS.bin
 * gets every output the same way. The model's signature and memory plan are printed on stdout.
 * Exit status: 0 on success, 1 on an API error (its name and message on stderr), 2 on a usage error.
 *
 * C99; builds with -Wall -Wextra -Werror -pedantic.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgecc_model.h"

static int fail(const char* what, edgecc_status st) {
  fprintf(stderr, "edgecc_run: %s: %s: %s\n", what, edgecc_status_name(st), edgecc_last_error());
  return 1;
}

/* The model first (its last outputs live in the arena), then the arena. */
static void finish(edgecc_model* model, void* arena) {
  edgecc_model_destroy(model);
  free(arena);
}

static void print_info(const char* kind, size_t i, const edgecc_tensor_info* info) {
  size_t d;
  printf("%s %lu: %s %s [", kind, (unsigned long)i, info->name, info->dtype);
  for (d = 0; d < info->ndim; ++d) printf(d ? ", %lld" : "%lld", (long long)info->shape[d]);
  printf("] %lu bytes\n", (unsigned long)info->nbytes);
}

int main(int argc, char** argv) {
  edgecc_model* model = NULL;
  edgecc_status st;
  edgecc_memory_info mem;
  edgecc_tensor_info info;
  const char *in_path, *out_path;
  size_t n_in = 0, n_out = 0, i;
  long repeat = 1, r;
  FILE* f;
  void* arena = NULL;
  size_t arena_bytes = 0;
  int use_arena = argc > 1 && strcmp(argv[1], "--arena") == 0;
  int linked = argc > 1 + use_arena && strcmp(argv[1 + use_arena], "--linked") == 0;
  int base = 1 + use_arena + linked;

  if (argc < base + 3 || argc > base + 4) {
    fprintf(stderr, "usage: edgecc_run [--arena] ARTIFACT_DIR INPUTS.bin OUTPUTS.bin [REPEAT]\n"
                    "       edgecc_run [--arena] --linked PARAMS.bin|- INPUTS.bin OUTPUTS.bin [REPEAT]\n");
    return 2;
  }
  in_path = argv[base + 1];
  out_path = argv[base + 2];
  if (argc == base + 4) repeat = atol(argv[base + 3]);
  if (repeat < 1) repeat = 1;

  if (linked) {
    st = edgecc_model_create_linked(strcmp(argv[base], "-") == 0 ? NULL : argv[base], &model);
  } else {
    st = edgecc_model_create(argv[base], &model);
  }
  if (st != EDGECC_OK) return fail("create", st);

  edgecc_model_num_inputs(model, &n_in);
  edgecc_model_num_outputs(model, &n_out);
  edgecc_model_memory(model, &mem);
  printf("memory: weights %llu, arena %llu, workspace %llu, io %llu bytes\n", (unsigned long long)mem.weights_bytes,
         (unsigned long long)mem.arena_bytes, (unsigned long long)mem.workspace_bytes,
         (unsigned long long)mem.io_bytes);
  f = fopen(in_path, "rb");
  if (f == NULL) {
    fprintf(stderr, "edgecc_run: cannot open %s\n", in_path);
    finish(model, arena);
    return 1;
  }
  for (i = 0; i < n_in; ++i) {
    void* buf;
    edgecc_model_input_info(model, i, &info);
    print_info("input", i, &info);
    buf = malloc(info.nbytes ? info.nbytes : 1);
    if (buf == NULL || fread(buf, 1, info.nbytes, f) != info.nbytes) {
      fprintf(stderr, "edgecc_run: %s is too short for input %lu ('%s', %lu bytes)\n", in_path, (unsigned long)i,
              info.name, (unsigned long)info.nbytes);
      free(buf);
      fclose(f);
      finish(model, arena);
      return 1;
    }
    st = edgecc_model_set_input(model, i, buf, info.nbytes);
    free(buf);
    if (st != EDGECC_OK) {
      fclose(f);
      finish(model, arena);
      return fail("set_input", st);
    }
  }
  fclose(f);

  /* after the inputs: the arena is what the runs use (the example's own read buffers are gone by now) */
  if (use_arena) {
    st = edgecc_model_arena_bytes(model, &arena_bytes);
    if (st != EDGECC_OK) {
      finish(model, arena);
      return fail("arena_bytes", st);
    }
    arena = malloc(arena_bytes);
    if (arena == NULL) {
      fprintf(stderr, "edgecc_run: cannot allocate a %lu-byte arena\n", (unsigned long)arena_bytes);
      finish(model, arena);
      return 1;
    }
    st = edgecc_model_set_arena(model, arena, arena_bytes);
    if (st != EDGECC_OK) {
      finish(model, arena);
      return fail("set_arena", st);
    }
    printf("arena: %lu bytes, caller-provided\n", (unsigned long)arena_bytes);
  }

  for (r = 0; r < repeat; ++r) {
    st = edgecc_model_run(model);
    if (st != EDGECC_OK) {
      finish(model, arena);
      return fail("run", st);
    }
  }
  if (use_arena) {
    size_t used = 0;
    edgecc_model_arena_used(model, &used);
    printf("arena: %lu of %lu bytes used\n", (unsigned long)used, (unsigned long)arena_bytes);
  }

  f = fopen(out_path, "wb");
  if (f == NULL) {
    fprintf(stderr, "edgecc_run: cannot write %s\n", out_path);
    finish(model, arena);
    return 1;
  }
  for (i = 0; i < n_out; ++i) {
    const void* data = NULL;
    size_t nbytes = 0;
    edgecc_model_output_info(model, i, &info);
    print_info("output", i, &info);
    st = edgecc_model_output_data(model, i, &data, &nbytes);
    if (st != EDGECC_OK || fwrite(data, 1, nbytes, f) != nbytes) {
      fclose(f);
      finish(model, arena);
      return st != EDGECC_OK ? fail("output", st) : 1;
    }
  }
  fclose(f);
  finish(model, arena);
  printf("ok: %lu inputs, %lu outputs, %ld runs\n", (unsigned long)n_in, (unsigned long)n_out, repeat);
  return 0;
}
