// Grouped KD rows at the baseline capability: scalar lanes; also the float64 path (gradcheck).
// The kernel has translation units of its own (not the distill_cpu_*.cpp ones), so that it builds alone.
#include "std_prelude.h"
// the kernel's other standard headers, also before the ISA pragma (see std_prelude.h)
#include <algorithm>
#include <utility>
#define KDFAST_CPU_CAPABILITY cpu_default
#define KDFAST_GROUPED_KD_BASELINE 1
#include "grouped_kd_entry.h"
