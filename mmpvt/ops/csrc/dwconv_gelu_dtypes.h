/* The row kernels of dwconv_gelu_rows.h for both map dtypes, named
 * <name>_<ISA_SUFFIX>_f32 and <name>_<ISA_SUFFIX>_bf16; dwconv_gelu.c includes this once per
 * instruction set, with ISA_SUFFIX defined and that set's `#pragma GCC target` in force. */
#define ROWS_CAT_(name, isa, dtype) name##_##isa##_##dtype
#define ROWS_CAT(name, isa, dtype) ROWS_CAT_(name, isa, dtype)

#define ELEM float
#define LOAD(x) (x)
#define STORE(v) (v)
#define ISA(name) ROWS_CAT(name, ISA_SUFFIX, f32)
#include "dwconv_gelu_rows.h"
#undef ISA
#undef ELEM
#undef LOAD
#undef STORE

#define ELEM uint16_t
#define LOAD(x) bf16_load(x)
#define STORE(v) bf16_store(v)
#define ISA(name) ROWS_CAT(name, ISA_SUFFIX, bf16)
#include "dwconv_gelu_rows.h"
#undef ISA
#undef ELEM
#undef LOAD
#undef STORE

#undef ROWS_CAT
#undef ROWS_CAT_
