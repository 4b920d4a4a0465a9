// Error codes and dtype tags shared by pyshrink's CUDA kernels and their torch binding.
//
// Device code never throws and never includes a torch header: every launcher returns a Status, and the
// binding (ops_cuda.cpp) turns a non-OK status into a TORCH_CHECK message that names the op and the
// shapes. Plain C++ (no CUDA types) so the host compiler can include it too.
#pragma once

namespace pyshrink_cuda {

enum class Status : int {
  kOk = 0,
  kUnsupportedGroupSize,  // group size not in {32, 64, 128}
  kUnsupportedDType,      // activation / output dtype the kernel was not instantiated for
  kBadShape,              // negative or inconsistent sizes
  kMisaligned,            // a pointer lacks the alignment the vector loads need (the binding re-allocates)
  kTooLarge,              // sizes beyond the grid limits or the device's shared memory
  kLaunchFailed,          // cudaGetLastError() after the launch was not cudaSuccess
};

// Element types of activations / outputs. Numbering is part of the binding's contract only.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* status_string(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kUnsupportedGroupSize: return "unsupported group size (the CUDA kernels take 32, 64 or 128)";
    case Status::kUnsupportedDType: return "unsupported dtype for this CUDA kernel";
    case Status::kBadShape: return "bad shape";
    case Status::kMisaligned: return "misaligned pointer (16-byte alignment needed)";
    case Status::kTooLarge: return "problem too large for the launch configuration";
    case Status::kLaunchFailed: return "kernel launch failed";
  }
  return "unknown status";
}

}  // namespace pyshrink_cuda
