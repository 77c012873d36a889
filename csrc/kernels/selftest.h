// Kernel-level self-checks that need no torch: shared by the C++ test binary
// (csrc/tests, ctest) and exposed to pytest through the extension.
#pragma once

#include <string>

namespace kdfast {

// Runs one row whose element offset (row * row_stride) exceeds 2^31 by
// shifting the base pointers backwards, and compares it with the same row at
// offset 0.  Returns an empty string on success, else what went wrong.
std::string check_large_row_offsets();

}  // namespace kdfast
