// The LTKD kernels at the baseline capability: scalar lanes; also the float64 path (gradcheck).
// (A translation unit of their own, as each capability's: the LTKD kernels rebuild without the distill ones.)
#define KDFAST_CPU_CAPABILITY cpu_default
#define KDFAST_DIST_BASELINE 1
#include "ltkd_entry.h"
