/*
 * edgecc_run: run an edgecc model through the C API (edgecc_model.h), with inputs and outputs as raw files.
 *
 *   edgecc_run ARTIFACT_DIR INPUTS.bin OUTPUTS.bin [REPEAT]          model.so + params.bin of the artifact
 *   edgecc_run --linked PARAMS.bin|- INPUTS.bin OUTPUTS.bin [REPEAT] model linked in (--emit static);
 *                                                                    '-': weights linked in (--embed-params)
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
  int linked = argc > 1 && strcmp(argv[1], "--linked") == 0;
  int base = linked ? 2 : 1;

  if (argc < base + 3 || argc > base + 4) {
    fprintf(stderr, "usage: edgecc_run ARTIFACT_DIR INPUTS.bin OUTPUTS.bin [REPEAT]\n"
                    "       edgecc_run --linked PARAMS.bin|- INPUTS.bin OUTPUTS.bin [REPEAT]\n");
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
    edgecc_model_destroy(model);
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
      edgecc_model_destroy(model);
      return 1;
    }
    st = edgecc_model_set_input(model, i, buf, info.nbytes);
    free(buf);
    if (st != EDGECC_OK) {
      fclose(f);
      edgecc_model_destroy(model);
      return fail("set_input", st);
    }
  }
  fclose(f);

  for (r = 0; r < repeat; ++r) {
    st = edgecc_model_run(model);
    if (st != EDGECC_OK) {
      edgecc_model_destroy(model);
      return fail("run", st);
    }
  }

  f = fopen(out_path, "wb");
  if (f == NULL) {
    fprintf(stderr, "edgecc_run: cannot write %s\n", out_path);
    edgecc_model_destroy(model);
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
      edgecc_model_destroy(model);
      return st != EDGECC_OK ? fail("output", st) : 1;
    }
  }
  fclose(f);
  edgecc_model_destroy(model);
  printf("ok: %lu inputs, %lu outputs, %ld runs\n", (unsigned long)n_in, (unsigned long)n_out, repeat);
  return 0;
}
