// linear_q4 instantiations for bfloat16 activations: the explicit list of supported (group size x zero
// points) combinations, each expanding to the three tile configurations of linear_q4_launch.cuh.
#include "cuda/linear_q4_launch.cuh"

namespace pyshrink_cuda {
namespace q4 {

Status launch_bf16(const Args& a, int group_size, bool has_zp, cudaStream_t stream) {
#define PYSHRINK_Q4_CASE(G, ZP) \
  if (group_size == G && has_zp == ZP) return launch_by_m<__nv_bfloat16, G, ZP>(a, stream);
  PYSHRINK_Q4_CASE(32, false)
  PYSHRINK_Q4_CASE(32, true)
  PYSHRINK_Q4_CASE(64, false)
  PYSHRINK_Q4_CASE(64, true)
  PYSHRINK_Q4_CASE(128, false)
  PYSHRINK_Q4_CASE(128, true)
#undef PYSHRINK_Q4_CASE
  return Status::kUnsupportedGroupSize;
}

}  // namespace q4
}  // namespace pyshrink_cuda
