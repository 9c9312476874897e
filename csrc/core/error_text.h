// The error text a core function returns beside Status::bad_value or Status::corrupt_stream: its words written
// as std::ostream writes them, as c10::str writes a TORCH_CHECK message, so a face can raise it unchanged.
#pragma once
#include <sstream>
#include <string>

namespace slimrate::core {

template <class... Words>
std::string error_text(const Words&... words) {
  std::ostringstream out;
  (out << ... << words);
  return out.str();
}

}  // namespace slimrate::core
