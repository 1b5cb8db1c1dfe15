// What the CUDA attention kernels are compiled for: two half types and three head dims (plain C++, for the host
// code that checks inputs; head_dim_dispatch.h turns the runtime values into template arguments).
#pragma once

#include <cstdint>

namespace softprompt {
namespace cuda {

enum class HalfType { kBFloat16, kFloat16 };

inline bool supports_head_dim(int64_t d) { return d == 64 || d == 128 || d == 256; }

}  // namespace cuda
}  // namespace softprompt
