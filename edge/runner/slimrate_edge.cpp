// The C API of slimrate_edge.h over ExecuTorch's Module (extension/module), as shipped in the executorch
// wheel's libexecutorch.so. Each entry point turns every failure into a status plus a message; the runtime's
// own error log lines of the failing call are appended to the message, so a corrupt program or a missing
// operator is named in the error rather than only on stderr.
#include "slimrate_edge.h"

#include <executorch/extension/module/module.h>
#include <executorch/runtime/core/exec_aten/util/scalar_type_util.h>
#include <executorch/runtime/platform/platform.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

// The wheel ships libexecutorch_threadpool.so but not extension/threadpool/threadpool.h; these are the two
// members of its ThreadPool we call, declared as that header declares them (non-virtual, so the layout of the
// class does not matter).
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Result;
using executorch::runtime::Tag;
using executorch::runtime::TensorInfo;
using executorch::runtime::etensor::Tensor;
using executorch::runtime::etensor::TensorImpl;

constexpr const char* kMethod = "forward";

constexpr size_t kMaxRuntimeLines = 6;  // a program missing many operators logs a line for each

thread_local std::string last_error;
thread_local std::vector<std::string> runtime_log;  // the runtime's distinct error lines of the current call
thread_local size_t runtime_lines_dropped = 0;

void capture_runtime_log(et_timestamp_t, et_pal_log_level_t level, const char*, const char*, size_t,
                         const char* message, size_t length) {
  if (level != kError && level != kFatal) {
    return;  // info and debug lines would only clutter a program's stderr
  }
  // A corrupt program's names reach these lines: bytes outside printable ASCII are written as \xNN.
  std::string line;
  for (size_t i = 0; i < length; ++i) {
    unsigned char c = static_cast<unsigned char>(message[i]);
    if (c >= 0x20 && c < 0x7f) {
      line += static_cast<char>(c);
    } else if (c != '\n') {
      char escaped[5];
      std::snprintf(escaped, sizeof escaped, "\\x%02x", c);
      line += escaped;
    }
  }
  while (!line.empty() && (line.back() == ' ' || line.back() == '.')) {
    line.pop_back();
  }
  if (std::find(runtime_log.begin(), runtime_log.end(), line) != runtime_log.end()) {
    return;
  }
  if (runtime_log.size() == kMaxRuntimeLines) {
    ++runtime_lines_dropped;
    return;
  }
  runtime_log.push_back(std::move(line));
}

// Started by every entry point: the runtime's log of this call starts empty.
struct Call {
  Call() {
    static std::once_flag once;
    std::call_once(once, [] {
      executorch::runtime::register_pal(executorch::runtime::PalImpl::create(capture_runtime_log, __FILE__));
    });
    runtime_log.clear();
    runtime_lines_dropped = 0;
  }
};

slimrate_edge_status fail(slimrate_edge_status status, std::string message) {
  for (size_t i = 0; i < runtime_log.size(); ++i) {
    message += (i == 0 ? " (the runtime said: " : "; ") + runtime_log[i];
  }
  if (runtime_lines_dropped > 0) {
    message += "; " + std::to_string(runtime_lines_dropped) + " more lines";
  }
  if (!runtime_log.empty()) {
    message += ")";
  }
  last_error = std::move(message);
  return status;
}

std::string error_name(Error error) {
  return executorch::runtime::to_string(error);
}

// One input or output of the method: its metadata, and the sizes and strides a TensorImpl points to.
struct Slot {
  slimrate_edge_tensor_info info{};
  ScalarType type{};
  std::vector<TensorImpl::SizesType> sizes;
  std::vector<TensorImpl::DimOrderType> dim_order;
  std::vector<TensorImpl::StridesType> strides;
};

// Fills *slot for tensor `what` (e.g. "input 1") of the method; false, with *why set, when it cannot be one.
bool make_slot(Result<Tag> tag, Result<TensorInfo> meta, const std::string& what, Slot* slot, std::string* why) {
  if (!tag.ok() || *tag != Tag::Tensor) {
    *why = what + " is a " + (tag.ok() ? executorch::runtime::tag_to_string(*tag) : "value of unknown kind") +
           ", not a tensor; slimrate_edge runs methods whose inputs and outputs are all tensors";
    return false;
  }
  if (!meta.ok()) {
    *why = what + ": the program's tensor metadata is unreadable (" + error_name(meta.error()) + ")";
    return false;
  }
  auto sizes = meta->sizes();
  auto dim_order = meta->dim_order();
  if (sizes.size() > SLIMRATE_EDGE_MAX_DIMS || dim_order.size() != sizes.size()) {
    *why = what + ": " + std::to_string(sizes.size()) + " dimensions, at most " +
           std::to_string(SLIMRATE_EDGE_MAX_DIMS) + " are supported";
    return false;
  }
  for (size_t d = 0; d < dim_order.size(); ++d) {
    if (dim_order[d] != d) {
      *why = what + " is not laid out row-major (its dim order is permuted, e.g. channels-last); export the "
                    "model with contiguous example inputs";
      return false;
    }
  }
  slot->type = meta->scalar_type();
  slot->info.dtype = static_cast<int>(slot->type);
  slot->info.ndim = sizes.size();
  slot->info.nbytes = meta->nbytes();
  slot->sizes.assign(sizes.begin(), sizes.end());
  slot->dim_order.assign(dim_order.begin(), dim_order.end());
  slot->strides.resize(sizes.size());
  TensorImpl::StridesType stride = 1;
  for (size_t d = sizes.size(); d-- > 0;) {  // row-major: the last dimension is contiguous
    slot->strides[d] = stride;
    stride *= sizes[d];
    slot->info.shape[d] = sizes[d];
  }
  return true;
}

std::string describe(const slimrate_edge_tensor_info& info) {
  std::string shape;
  for (size_t d = 0; d < info.ndim; ++d) {
    shape += (d ? ", " : "") + std::to_string(info.shape[d]);
  }
  return std::string(slimrate_edge_dtype_name(info.dtype)) + " (" + shape + "), " + std::to_string(info.nbytes) +
         " bytes";
}

}  // namespace

struct slimrate_edge_model {
  std::unique_ptr<Module> module;
  std::vector<Slot> inputs;
  std::vector<Slot> outputs;
};

namespace {

// Why `path` cannot be opened for reading, or "" when it can: the loader only reports AccessFailed.
std::string unreadable_reason(const char* path) {
  FILE* file = std::fopen(path, "rb");
  if (file == nullptr) {
    return std::strerror(errno);
  }
  std::fclose(file);
  return "";
}

// The message of a failed load of the program (its header, flatbuffer and segments).
std::string program_failure(const std::string& path, Error error) {
  return "slimrate_edge_load: '" + path + "' is not a valid ExecuTorch program: the file is corrupt, truncated " +
         "or not a .pte (" + error_name(error) + ")";
}

// The message of a failed load of the forward method of a valid program.
std::string method_failure(const std::string& path, Error error) {
  std::string where = "slimrate_edge_load: '" + path + "': the forward method ";
  switch (error) {
    case Error::OperatorMissing:
      return where + "uses an operator that no kernel library linked into this program provides (" +
             error_name(error) + "); link the library that registers it";
    case Error::NotFound:
      return where + "is missing or needs a backend this runtime lacks (" + error_name(error) + ")";
    default:
      return where + "could not be loaded (" + error_name(error) + ")";
  }
}

// Loads the program, its forward method and the slots of its inputs and outputs into model.
slimrate_edge_status load_into(slimrate_edge_model& model, const char* path) {
  std::string reason = unreadable_reason(path);
  if (!reason.empty()) {
    return fail(SLIMRATE_EDGE_LOAD_FAILED, std::string("slimrate_edge_load: cannot open '") + path + "': " + reason);
  }
  model.module = std::make_unique<Module>(path, Module::LoadMode::Mmap);
  // InternalConsistency: the flatbuffer verifier checks every offset, so a corrupt file fails here.
  Error error = model.module->load(executorch::runtime::Program::Verification::InternalConsistency);
  if (error != Error::Ok) {
    return fail(SLIMRATE_EDGE_LOAD_FAILED, program_failure(path, error));
  }
  error = model.module->load_method(kMethod);
  if (error != Error::Ok) {
    return fail(SLIMRATE_EDGE_LOAD_FAILED, method_failure(path, error));
  }
  auto meta = model.module->method_meta(kMethod);
  if (!meta.ok()) {
    return fail(SLIMRATE_EDGE_LOAD_FAILED, method_failure(path, meta.error()));
  }
  std::string why;
  model.inputs.resize(meta->num_inputs());
  model.outputs.resize(meta->num_outputs());
  for (size_t i = 0; i < model.inputs.size() && why.empty(); ++i) {
    make_slot(meta->input_tag(i), meta->input_tensor_meta(i), "input " + std::to_string(i), &model.inputs[i], &why);
  }
  for (size_t i = 0; i < model.outputs.size() && why.empty(); ++i) {
    make_slot(meta->output_tag(i), meta->output_tensor_meta(i), "output " + std::to_string(i), &model.outputs[i],
              &why);
  }
  if (!why.empty()) {
    return fail(SLIMRATE_EDGE_LOAD_FAILED, std::string("slimrate_edge_load: '") + path + "': " + why);
  }
  return SLIMRATE_EDGE_OK;
}

slimrate_edge_status tensor_info(const std::vector<Slot>* slots, const char* kind, size_t index,
                                 slimrate_edge_tensor_info* info) {
  if (slots == nullptr || info == nullptr) {
    return fail(SLIMRATE_EDGE_INVALID_ARGUMENT,
                std::string("slimrate_edge_") + kind + "_info: model and info must not be NULL");
  }
  if (index >= slots->size()) {
    return fail(SLIMRATE_EDGE_INVALID_ARGUMENT, std::string("slimrate_edge_") + kind + "_info: index " +
                                                    std::to_string(index) + " is out of range; the model has " +
                                                    std::to_string(slots->size()) + " " + kind + "s");
  }
  *info = (*slots)[index].info;
  return SLIMRATE_EDGE_OK;
}

// Why a buffer of slimrate_edge_run cannot hold `kind` number `index`, or "" when it can.
std::string buffer_mismatch(const Slot& slot, const void* data, size_t nbytes, const char* kind, size_t index) {
  if ((data != nullptr || slot.info.nbytes == 0) && nbytes == slot.info.nbytes) {
    return "";  // an empty tensor needs no buffer
  }
  std::string what = std::string("slimrate_edge_run: ") + kind + " " + std::to_string(index) + ": ";
  return data == nullptr ? what + "the buffer is NULL"
                         : what + "expected " + describe(slot.info) + ", got " + std::to_string(nbytes) + " bytes";
}

}  // namespace

extern "C" {

slimrate_edge_model* slimrate_edge_load(const char* path, const char** error) {
  Call call;
  auto model = std::make_unique<slimrate_edge_model>();
  slimrate_edge_status status = path == nullptr
                                    ? fail(SLIMRATE_EDGE_INVALID_ARGUMENT, "slimrate_edge_load: path is NULL")
                                    : load_into(*model, path);
  if (status != SLIMRATE_EDGE_OK) {
    if (error != nullptr) {
      *error = last_error.c_str();
    }
    return nullptr;
  }
  return model.release();
}

void slimrate_edge_free(slimrate_edge_model* model) {
  Call call;
  delete model;
}

size_t slimrate_edge_num_inputs(const slimrate_edge_model* model) {
  return model == nullptr ? 0 : model->inputs.size();
}

size_t slimrate_edge_num_outputs(const slimrate_edge_model* model) {
  return model == nullptr ? 0 : model->outputs.size();
}

slimrate_edge_status slimrate_edge_input_info(const slimrate_edge_model* model, size_t index,
                                              slimrate_edge_tensor_info* info) {
  Call call;
  return tensor_info(model ? &model->inputs : nullptr, "input", index, info);
}

slimrate_edge_status slimrate_edge_output_info(const slimrate_edge_model* model, size_t index,
                                               slimrate_edge_tensor_info* info) {
  Call call;
  return tensor_info(model ? &model->outputs : nullptr, "output", index, info);
}

slimrate_edge_status slimrate_edge_run(slimrate_edge_model* model, const void* const* inputs,
                                       const size_t* input_nbytes, void* const* outputs,
                                       const size_t* output_nbytes) {
  Call call;
  if (model == nullptr || (!model->inputs.empty() && (inputs == nullptr || input_nbytes == nullptr)) ||
      outputs == nullptr || output_nbytes == nullptr) {
    return fail(SLIMRATE_EDGE_INVALID_ARGUMENT,
                "slimrate_edge_run: model, outputs and output_nbytes (and inputs and input_nbytes when the "
                "model has inputs) must not be NULL");
  }
  std::vector<TensorImpl> impls;
  impls.reserve(model->inputs.size());
  std::vector<EValue> values;
  for (size_t i = 0; i < model->inputs.size(); ++i) {
    Slot& slot = model->inputs[i];
    std::string why = buffer_mismatch(slot, inputs[i], input_nbytes[i], "input", i);
    if (!why.empty()) {
      return fail(SLIMRATE_EDGE_INVALID_ARGUMENT, why);
    }
    // The runtime copies a memory-planned input into its own buffer and never writes to an input.
    impls.emplace_back(slot.type, static_cast<ssize_t>(slot.sizes.size()), slot.sizes.data(),
                       const_cast<void*>(inputs[i]), slot.dim_order.data(), slot.strides.data());
    values.emplace_back(Tensor(&impls.back()));
  }
  for (size_t j = 0; j < model->outputs.size(); ++j) {
    std::string why = buffer_mismatch(model->outputs[j], outputs[j], output_nbytes[j], "output", j);
    if (!why.empty()) {
      return fail(SLIMRATE_EDGE_INVALID_ARGUMENT, why);
    }
  }
  auto result = model->module->execute(kMethod, values);
  if (!result.ok()) {
    return fail(SLIMRATE_EDGE_RUN_FAILED,
                "slimrate_edge_run: the forward method failed (" + error_name(result.error()) + ")");
  }
  for (size_t j = 0; j < model->outputs.size(); ++j) {
    const EValue& value = (*result)[j];
    if (!value.isTensor() || value.toTensor().nbytes() != output_nbytes[j]) {
      return fail(SLIMRATE_EDGE_RUN_FAILED, "slimrate_edge_run: output " + std::to_string(j) +
                                                " does not have the dtype and shape the program declares");
    }
    std::memcpy(outputs[j], value.toTensor().const_data_ptr(), output_nbytes[j]);
  }
  return SLIMRATE_EDGE_OK;
}

slimrate_edge_status slimrate_edge_set_num_threads(unsigned num_threads) {
  Call call;
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (num_threads == 0 || pool == nullptr || !pool->_unsafe_reset_threadpool(num_threads)) {
    return fail(SLIMRATE_EDGE_INVALID_ARGUMENT, "slimrate_edge_set_num_threads: could not size the thread pool to " +
                                                    std::to_string(num_threads) + " threads (expected at least 1)");
  }
  return SLIMRATE_EDGE_OK;
}

const char* slimrate_edge_dtype_name(int dtype) {
  switch (dtype) {
    case SLIMRATE_EDGE_UINT8: return "uint8";
    case SLIMRATE_EDGE_INT8: return "int8";
    case SLIMRATE_EDGE_INT16: return "int16";
    case SLIMRATE_EDGE_INT32: return "int32";
    case SLIMRATE_EDGE_INT64: return "int64";
    case SLIMRATE_EDGE_FLOAT16: return "float16";
    case SLIMRATE_EDGE_FLOAT32: return "float32";
    case SLIMRATE_EDGE_FLOAT64: return "float64";
    case SLIMRATE_EDGE_BOOL: return "bool";
    case SLIMRATE_EDGE_BFLOAT16: return "bfloat16";
    default: return "unknown";
  }
}

const char* slimrate_edge_last_error(void) {
  return last_error.c_str();
}

}  // extern "C"
