// The decode kernels for head dim 128 (one file per head dim keeps builds parallel).
#include "cuda/head_dim_dispatch.h"
#include "cuda/decode_kernel.cuh"

SOFTPROMPT_INSTANTIATE_HALF_TYPES(run_prefix_decode, DecodeParams, 128)
