// The element types the CPU kernels are compiled for: every floating dtype the ops take.
// X(T) is expanded once per type (explicit instantiations of a kernel entry point).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define SOFTPROMPT_FOR_CPU_FLOAT_TYPES(X) X(float) X(double) X(c10::BFloat16) X(c10::Half)
