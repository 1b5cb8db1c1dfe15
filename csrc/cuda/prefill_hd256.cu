// The prefill kernels for head dim 256 (one file per head dim keeps builds parallel).
#include "cuda/head_dim_dispatch.h"
#include "cuda/prefill_kernel.cuh"

SOFTPROMPT_INSTANTIATE_HALF_TYPES(run_prefix_prefill, PrefixAttentionParams, 256)
