// slimrate_run: runs the forward method of an ExecuTorch program on inputs read from raw .bin files and
// writes its outputs the same way (docs/edge-runner.md), through the C API of slimrate_edge.h only.
//
//   slimrate_run model.pte --input in.bin [--input in2.bin ...] [--output out.bin ...] [--bench N] [--threads K]
//   slimrate_run model.pte --info
//
// Exit status: 0 on success, 1 when the model fails to load or run, 2 on a usage or file error.
#include "slimrate_edge.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

constexpr int kWarmupRuns = 3;  // first runs pay for page faults of the mmapped weights and XNNPACK's packing

const char* const kUsage =
    "usage: slimrate_run MODEL.pte [--input IN.bin ...] [--output OUT.bin ...] [--bench N] [--threads K]\n"
    "       slimrate_run MODEL.pte --info\n"
    "One --input per input of the method, in order; with --output, one per output. A .bin file holds the\n"
    "tensor's raw data: row-major, in the dtype and shape --info prints, nothing else.\n";

struct Options {
  std::string model;
  std::vector<std::string> inputs;
  std::vector<std::string> outputs;
  long bench_runs = 0;
  long threads = 0;
  bool info = false;
};

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "slimrate_run: error: %s\n%s", message.c_str(), kUsage);
  std::exit(2);
}

[[noreturn]] void file_error(const std::string& message) {
  std::fprintf(stderr, "slimrate_run: error: %s\n", message.c_str());
  std::exit(2);
}

[[noreturn]] void model_error(const std::string& message) {
  std::fprintf(stderr, "slimrate_run: error: %s\n", message.c_str());
  std::exit(1);
}

long positive_number(const char* flag, const std::string& text) {
  char* end = nullptr;
  long value = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || value < 1) {
    usage_error(std::string(flag) + ": expected a positive integer, got '" + text + "'");
  }
  return value;
}

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    bool has_value = i + 1 < argc;
    if (arg == "--info") {
      options.info = true;
    } else if (arg == "--input" || arg == "--output" || arg == "--bench" || arg == "--threads") {
      if (!has_value) {
        usage_error(arg + " needs a value");
      }
      std::string value = argv[++i];
      if (arg == "--input") {
        options.inputs.push_back(value);
      } else if (arg == "--output") {
        options.outputs.push_back(value);
      } else if (arg == "--bench") {
        options.bench_runs = positive_number("--bench", value);
      } else {
        options.threads = positive_number("--threads", value);
      }
    } else if (arg.rfind("--", 0) == 0 || !options.model.empty()) {
      usage_error("unexpected argument '" + arg + "'");
    } else {
      options.model = arg;
    }
  }
  if (options.model.empty()) {
    usage_error("no model given");
  }
  return options;
}

std::string describe(const slimrate_edge_tensor_info& info) {
  std::string text = std::string(slimrate_edge_dtype_name(info.dtype)) + " (";
  for (size_t d = 0; d < info.ndim; ++d) {
    text += (d ? ", " : "") + std::to_string(info.shape[d]);
  }
  return text + "), " + std::to_string(info.nbytes) + " bytes";
}

std::vector<slimrate_edge_tensor_info> infos(slimrate_edge_model* model, bool inputs) {
  size_t count = inputs ? slimrate_edge_num_inputs(model) : slimrate_edge_num_outputs(model);
  std::vector<slimrate_edge_tensor_info> result(count);
  for (size_t i = 0; i < count; ++i) {
    auto status = inputs ? slimrate_edge_input_info(model, i, &result[i])
                         : slimrate_edge_output_info(model, i, &result[i]);
    if (status != SLIMRATE_EDGE_OK) {
      model_error(slimrate_edge_last_error());
    }
  }
  return result;
}

void print_info(const std::vector<slimrate_edge_tensor_info>& inputs,
                const std::vector<slimrate_edge_tensor_info>& outputs) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    std::printf("input %zu: %s\n", i, describe(inputs[i]).c_str());
  }
  for (size_t j = 0; j < outputs.size(); ++j) {
    std::printf("output %zu: %s\n", j, describe(outputs[j]).c_str());
  }
}

std::vector<char> read_input(const std::string& path, size_t index, const slimrate_edge_tensor_info& info) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    file_error("cannot read input " + std::to_string(index) + " from '" + path + "'");
  }
  std::vector<char> data((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (data.size() != info.nbytes) {
    file_error("input " + std::to_string(index) + " '" + path + "': expected " + describe(info) + ", got " +
               std::to_string(data.size()) + " bytes; write the tensor's raw data in that dtype and shape "
               "(numpy: array.astype(dtype).tofile(path))");
  }
  return data;
}

void write_output(const std::string& path, const std::vector<char>& data) {
  std::ofstream file(path, std::ios::binary);
  file.write(data.data(), static_cast<std::streamsize>(data.size()));
  if (!file) {
    file_error("cannot write '" + path + "'");
  }
}

// Times `runs` calls of run after the warm-up; prints the median and minimum in milliseconds.
template <typename Run>
void bench(long runs, Run run) {
  for (int i = 0; i < kWarmupRuns; ++i) {
    run();
  }
  std::vector<double> ms(runs);
  for (long i = 0; i < runs; ++i) {
    auto start = std::chrono::steady_clock::now();
    run();
    ms[i] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  }
  std::sort(ms.begin(), ms.end());
  double median = runs % 2 ? ms[runs / 2] : (ms[runs / 2 - 1] + ms[runs / 2]) / 2;
  std::printf("latency over %ld runs after %d warm-up runs: median %.3f ms, min %.3f ms\n", runs, kWarmupRuns,
              median, ms[0]);
}

}  // namespace

int main(int argc, char** argv) {
  Options options = parse(argc, argv);
  if (options.threads > 0 && slimrate_edge_set_num_threads(static_cast<unsigned>(options.threads)) != 0) {
    model_error(slimrate_edge_last_error());
  }
  const char* error = nullptr;
  slimrate_edge_model* model = slimrate_edge_load(options.model.c_str(), &error);
  if (model == nullptr) {
    model_error(error);
  }
  auto input_infos = infos(model, true);
  auto output_infos = infos(model, false);
  if (options.info) {
    print_info(input_infos, output_infos);
    slimrate_edge_free(model);
    return 0;
  }
  if (options.inputs.size() != input_infos.size()) {
    usage_error("the model takes " + std::to_string(input_infos.size()) + " inputs, got " +
                std::to_string(options.inputs.size()) + " --input files");
  }
  if (!options.outputs.empty() && options.outputs.size() != output_infos.size()) {
    usage_error("the model has " + std::to_string(output_infos.size()) + " outputs, got " +
                std::to_string(options.outputs.size()) + " --output files");
  }
  std::vector<std::vector<char>> inputs, outputs;
  std::vector<const void*> input_ptrs;
  std::vector<void*> output_ptrs;
  std::vector<size_t> input_nbytes, output_nbytes;
  for (size_t i = 0; i < input_infos.size(); ++i) {
    inputs.push_back(read_input(options.inputs[i], i, input_infos[i]));
    input_ptrs.push_back(inputs.back().data());
    input_nbytes.push_back(inputs.back().size());
  }
  for (const auto& info : output_infos) {
    outputs.emplace_back(info.nbytes);
    output_ptrs.push_back(outputs.back().data());
    output_nbytes.push_back(info.nbytes);
  }
  auto run = [&] {
    if (slimrate_edge_run(model, input_ptrs.data(), input_nbytes.data(), output_ptrs.data(),
                          output_nbytes.data()) != SLIMRATE_EDGE_OK) {
      model_error(slimrate_edge_last_error());
    }
  };
  run();
  for (size_t j = 0; j < options.outputs.size(); ++j) {
    write_output(options.outputs[j], outputs[j]);
  }
  if (options.bench_runs > 0) {
    bench(options.bench_runs, run);
  }
  slimrate_edge_free(model);
  return 0;
}
