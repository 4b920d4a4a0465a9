// linear_q4 instantiations for float16 activations (the list of group sizes is launch_any_group's, in
// linear_q4_launch.cuh).
#include "cuda/linear_q4_launch.cuh"

namespace pyshrink_cuda {
namespace q4 {

Status launch_f16(const Args& a, int group_size, bool has_zp, cudaStream_t stream) {
  return launch_any_group<__half>(a, group_size, has_zp, stream);
}

}  // namespace q4
}  // namespace pyshrink_cuda
