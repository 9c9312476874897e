// core_check FOLDER: runs every FOLDER/*.case (tools/core_cases.py) through the torch-free core and compares the
// outputs with the Python reference's. Each case runs twice, on 1 thread and on kThreads, and must give the same
// outputs both times. Prints one line per case; exits 1 if any case fails or none is found.
// A family adds its checkers in check_<family>.cpp and one line per op to kCheckers.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tests/check.h"

namespace slimrate::tests {

void check_rate_stats(const Case& c, Verdict& v);
void check_rate_grad(const Case& c, Verdict& v);
void check_sparse_linear(const Case& c, Verdict& v);
void check_nf4_quantize(const Case& c, Verdict& v);
void check_nf4_dequantize(const Case& c, Verdict& v);
void check_nf4_absmax_dequantize(const Case& c, Verdict& v);
void check_nf4_linear(const Case& c, Verdict& v);
void check_ctmc_transition_rows(const Case& c, Verdict& v);
void check_ctmc_transition_rows_backward(const Case& c, Verdict& v);
void check_ctmc_rate_cols(const Case& c, Verdict& v);
void check_score_entropy(const Case& c, Verdict& v);
void check_eg_encode(const Case& c, Verdict& v);
void check_eg_decode(const Case& c, Verdict& v);
void check_rans_encode(const Case& c, Verdict& v);
void check_rans_decode(const Case& c, Verdict& v);
void check_slim_encode(const Case& c, Verdict& v);
void check_slim_decode(const Case& c, Verdict& v);

struct Checker {
  const char* op;
  void (*check)(const Case&, Verdict&);
};

const Checker kCheckers[] = {
    {"rate_stats", check_rate_stats},
    {"rate_grad_", check_rate_grad},
    {"sparse_linear", check_sparse_linear},
    {"nf4_quantize", check_nf4_quantize},
    {"nf4_dequantize", check_nf4_dequantize},
    {"nf4_absmax_dequantize", check_nf4_absmax_dequantize},
    {"nf4_linear", check_nf4_linear},
    {"ctmc_transition_rows", check_ctmc_transition_rows},
    {"ctmc_transition_rows_backward", check_ctmc_transition_rows_backward},
    {"ctmc_rate_cols", check_ctmc_rate_cols},
    {"score_entropy", check_score_entropy},
    {"eg_encode", check_eg_encode},
    {"eg_decode", check_eg_decode},
    {"rans_encode", check_rans_encode},
    {"rans_decode", check_rans_decode},
    {"slim_encode", check_slim_encode},
    {"slim_decode", check_slim_decode},
};

// More threads than the build machine's 2 cores, so parallel_for splits into uneven chunks as well.
constexpr int kThreads = 3;

Verdict run_case(const Case& c, const Checker& checker, int threads) {
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
  Verdict v;
  checker.check(c, v);
  return v;
}

// One line for the case: PASS with the worst error/tolerance ratio, or FAIL with what failed.
bool check_file(const std::filesystem::path& path) {
  std::string label = path.stem().string();
  try {
    Case c = read_case(path.string(), label);
    const Checker* checker = std::find_if(std::begin(kCheckers), std::end(kCheckers),
                                          [&](const Checker& k) { return c.op == k.op; });
    if (checker == std::end(kCheckers)) throw std::runtime_error("no checker for op '" + c.op + "'");
    Verdict v = run_case(c, *checker, 1), many = run_case(c, *checker, kThreads);
    if (v.ok && !many.ok) v.fail("on " + std::to_string(kThreads) + " threads: " + many.failures);
    if (v.ok && v.outputs != many.outputs)
      v.fail("outputs differ between 1 and " + std::to_string(kThreads) + " threads");
    if (v.ok) {
      std::printf("PASS %s (worst err/tol %.2f)\n", label.c_str(), std::max(v.worst, many.worst));
      return true;
    }
    std::printf("FAIL %s: %s\n", label.c_str(), v.failures.c_str());
  } catch (const std::exception& e) {
    std::printf("FAIL %s: %s\n", label.c_str(), e.what());
  }
  return false;
}

}  // namespace slimrate::tests

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s FOLDER  (the *.case files of tools/core_cases.py)\n", argv[0]);
    return 2;
  }
  std::vector<std::filesystem::path> files;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(argv[1], error))
    if (entry.path().extension() == ".case") files.push_back(entry.path());
  if (error || files.empty()) {
    std::fprintf(stderr, "core_check: no .case files in %s\n", argv[1]);
    return 1;
  }
  std::sort(files.begin(), files.end());
  int failed = 0;
  for (const auto& path : files) failed += !slimrate::tests::check_file(path);
  std::printf("%zu cases, %d failed\n", files.size(), failed);
  return failed ? 1 : 0;
}
