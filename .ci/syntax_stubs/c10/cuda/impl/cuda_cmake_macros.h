// Stand-in for the header CUDA builds of torch generate (the CPU wheel lacks it); used only to
// syntax-check the CUDA binding files on machines without a CUDA build of torch.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
