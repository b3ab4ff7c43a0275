// The runtime behind emulated_cuda.h: launches run on a few worker threads, each block's
// CUDA threads as fibers of one worker, scheduled in a seeded random order at every barrier
// and shuffle. A test tool (tests/cuda_emulation); see emulated_cuda.h for what it offers.
//
// Under ThreadSanitizer (scripts/cuda_emulated_races.sh) every fiber is a thread of its own
// to TSAN, switched to without synchronisation; the only happens-before edges between the
// CUDA threads are the ones CUDA gives: a block starts after its launch, a barrier orders
// what came before it in every thread before what comes after it in any, a launch ends
// after all its blocks. A missing __syncthreads is then a reported race, whatever order the
// fibers happened to run in. (Shuffles exchange values, not memory order.) The runtime's
// own bookkeeping, which fibers and their scheduler share without such edges, is kept out of
// TSAN's sight (`Untracked`): the workers' schedulers entirely, a fiber while it is inside
// the runtime (a barrier, a shuffle, its start and end).
#include "runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define SPEM_EMU_TSAN 1
extern "C" {
void* __tsan_get_current_fiber();
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#else
#define SPEM_EMU_TSAN 0
#endif

// --- 16-bit conversions (as c10's and CUDA's: round to nearest even) ---

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

float __half2float(__half h) {
  const uint32_t w = uint32_t(h.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized);
  return float_of(sign | magnitude);
}

__half __float2half_rn(float f) {
  float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_of(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return {uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

float __bfloat162float(__nv_bfloat16 h) { return float_of(uint32_t(h.bits) << 16); }

__nv_bfloat16 __float2bfloat16_rn(float f) {
  if (f != f) return {0x7FC0};
  const uint32_t u = bits_of(f);
  return {uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

// --- errors ---

namespace {
thread_local std::string t_last_error;
}

const char* cudaGetErrorString(cudaError_t error) {
  if (error != cudaSuccess && !t_last_error.empty()) return t_last_error.c_str();
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() { return cudaSuccess; }  // launches report their own errors

namespace spem_emu {

thread_local const ThreadCoordinates* current = nullptr;

namespace {

// --- fibers: a stack and a saved stack pointer; switching saves the callee-saved state ---

#if defined(__x86_64__)
extern "C" void spem_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .hidden spem_emu_switch
  .type spem_emu_switch, @function
spem_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size spem_emu_switch, .-spem_emu_switch
)");
#else
#error "the CUDA emulation switches fibers with x86-64 assembly; port spem_emu_switch"
#endif

extern "C" [[noreturn]] void spem_emu_fiber_entry();

// A fiber's first switch "returns" into spem_emu_fiber_entry with the stack aligned as
// after a call; the saved MXCSR and x87 control word are the creating thread's.
void* initial_frame(char* top) {
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 10;  // 80 bytes: 16-aligned
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  std::memset(sp, 0, 80);
  std::memcpy(reinterpret_cast<char*>(sp), &fpcw, sizeof(fpcw));
  std::memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, sizeof(mxcsr));
  sp[8] = reinterpret_cast<uint64_t>(&spem_emu_fiber_entry);  // popped by ret
  sp[9] = 0;  // the entry's return address: none, it never returns
  return sp;
}

constexpr size_t kStackBytes = SPEM_EMU_TSAN ? (1u << 20) : (256u << 10);

struct BlockState;

struct Fiber {
  enum State { kReady, kAtBarrier, kAtShuffle, kDone, kFailed };
  char* mapping = nullptr;  // guard page, then the stack
  void* sp = nullptr;
  void* tsan = nullptr;
  ThreadCoordinates coords{};
  int tid = 0;
  State state = kReady;
  BlockState* block = nullptr;

  Fiber() = default;
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
  ~Fiber() {
    if (mapping != nullptr) munmap(mapping, kStackBytes + page());
  }
  static size_t page() { return size_t(sysconf(_SC_PAGESIZE)); }
  void allocate() {
    void* m = mmap(nullptr, kStackBytes + page(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    mapping = static_cast<char*>(m);
    mprotect(mapping, page(), PROT_NONE);  // an overflow faults instead of corrupting
#if SPEM_EMU_TSAN
    tsan = __tsan_create_fiber(0);
#endif
  }
  char* top() const { return mapping + page() + kStackBytes; }
};

struct Launch {
  const void* kernel;
  std::string name;
  dim3 grid, block;
  std::function<void()> body;
  uint64_t seed;
};

struct WarpState {
  int arrived = 0, exited = 0;
  unsigned parity = 0;
  int lane_mask = 0;
  size_t size = 0;
  uint64_t slots[2][32];
};

// xorshift64*: the scheduler draws one number per switch, so it must be cheap.
struct Random {
  uint64_t state;
  explicit Random(uint64_t seed = 1) : state(seed | 1) {}
  uint64_t next() {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 2685821657736338717ull;
  }
  size_t below(size_t n) { return size_t((next() >> 32) % n); }
};

// One block's run: its threads' fibers, barrier and shuffle state, the first error.
struct BlockState {
  const Launch* launch = nullptr;
  uint3 block_idx{};
  int threads = 0, exited = 0, barrier_arrived = 0;
  unsigned barrier_generation = 0;
  std::vector<WarpState> warps;
  std::vector<int> ready;
  Random rng;
  std::string error;
  // Addresses that TSAN synchronises on (see the top of this file).
  char tsan_start = 0, tsan_end = 0, tsan_barrier[2] = {0, 0};
};

// A worker: an OS thread that runs whole blocks, one at a time, as fibers.
struct Worker {
  std::vector<std::unique_ptr<Fiber>> fibers;
  void* scheduler_sp = nullptr;
  void* scheduler_tsan = nullptr;
  int blocks_since_new_fibers = 0;
};

// TSAN keeps each fiber's history until the fiber ends: fibers that run block after block
// would hold gigabytes. Under TSAN a worker gives its fibers new TSAN identities every
// kTsanBlocksPerFiber blocks (an identity is a thread to TSAN: costly to make).
constexpr int kTsanBlocksPerFiber = 16;

void renew_tsan_fibers(Worker& worker) {
#if SPEM_EMU_TSAN
  if (++worker.blocks_since_new_fibers < kTsanBlocksPerFiber) return;
  worker.blocks_since_new_fibers = 0;
  for (auto& f : worker.fibers) {
    __tsan_destroy_fiber(f->tsan);
    f->tsan = __tsan_create_fiber(0);
  }
#else
  (void)worker;
#endif
}

thread_local Worker* t_worker = nullptr;
thread_local Fiber* t_fiber = nullptr;

// While one exists, TSAN does not record the calling fiber's (or thread's) reads and writes.
struct Untracked {
#if SPEM_EMU_TSAN
  Untracked() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Untracked() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#endif
};

void tsan_acquire(void* a) {
#if SPEM_EMU_TSAN
  __tsan_acquire(a);
#else
  (void)a;
#endif
}

void tsan_release(void* a) {
#if SPEM_EMU_TSAN
  __tsan_release(a);
#else
  (void)a;
#endif
}

void switch_to(void** save, void* load, void* tsan_target) {
#if SPEM_EMU_TSAN
  __tsan_switch_to_fiber(tsan_target, 1 /* __tsan_switch_to_fiber_no_sync */);
#else
  (void)tsan_target;
#endif
  spem_emu_switch(save, load);
}

// Takes a random ready fiber of block b off its ready list (b.ready must not be empty).
Fiber& pick_ready(BlockState& b);

// From a fiber that has just waited (or exited, or failed): on to a random ready fiber of
// its block, itself included, until it is picked again; to the worker's scheduler where
// none is ready (the block ended, failed or is stuck) or the block failed. `ending`: the
// fiber leaves for good, and first closes the caller's Untracked (under TSAN a fiber that
// stops with its accesses untracked is an error when it is destroyed).
void yield_to_scheduler(bool ending = false) {
  Fiber& self = *t_fiber;
  BlockState& b = *self.block;
  // What the thread did so far happens before its launch ends (run_block acquires it), also
  // where it never resumes: a failed or stuck block, whose host frame is then reused.
  tsan_release(&b.tsan_end);
  void* sp = t_worker->scheduler_sp;
  void* tsan = t_worker->scheduler_tsan;
  if (b.error.empty() && !b.ready.empty()) {
    Fiber& next = pick_ready(b);
    if (&next == &self) return;
    t_fiber = &next;
    current = &next.coords;
    sp = next.sp;
    tsan = next.tsan;
  }
#if SPEM_EMU_TSAN
  if (ending) {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#endif
  switch_to(&self.sp, sp, tsan);
}

std::string where(const Fiber& f) {
  std::ostringstream s;
  s << "thread (" << f.coords.thread_idx.x << ", " << f.coords.thread_idx.y << ", "
    << f.coords.thread_idx.z << ") of block (" << f.coords.block_idx.x << ", "
    << f.coords.block_idx.y << ", " << f.coords.block_idx.z << ")";
  return s.str();
}

// A fiber's misuse of CUDA: the block (and so the launch) fails; the fiber never resumes.
[[noreturn]] void fail(const std::string& what) {
  Fiber& f = *t_fiber;
  if (f.block->error.empty()) f.block->error = where(f) + ": " + what;
  f.state = Fiber::kFailed;
  yield_to_scheduler();
  __builtin_unreachable();
}

void make_ready(BlockState& b, Fiber& f) {
  f.state = Fiber::kReady;
  b.ready.push_back(f.tid);
}

extern "C" void spem_emu_fiber_entry() {
  BlockState* b;
  {
    const Untracked untracked;
    b = t_fiber->block;
    tsan_acquire(&b->tsan_start);
  }
  std::string thrown;
  try {
    b->launch->body();
  } catch (const std::exception& e) {
    thrown = e.what();
  }
  const Untracked untracked;
  if (!thrown.empty()) fail("exception: " + thrown);
  Fiber& f = *t_fiber;
  f.state = Fiber::kDone;
  ++b->exited;
  WarpState& w = b->warps[f.tid / 32];
  ++w.exited;
  if (b->barrier_arrived > 0)
    fail("exited while " + std::to_string(b->barrier_arrived) +
         " threads of its block wait at __syncthreads()");
  if (w.arrived > 0)
    fail("exited while " + std::to_string(w.arrived) + " lanes of its warp wait at a shuffle");
  yield_to_scheduler(/*ending=*/true);
  __builtin_unreachable();
}

std::string deadlock_report(const BlockState& b) {
  std::ostringstream s;
  s << "block (" << b.block_idx.x << ", " << b.block_idx.y << ", " << b.block_idx.z
    << ") is stuck: " << b.barrier_arrived << " threads wait at __syncthreads()";
  for (size_t w = 0; w < b.warps.size(); ++w)
    if (b.warps[w].arrived > 0)
      s << ", " << b.warps[w].arrived << " lanes of warp " << w << " at a shuffle";
  s << ", " << b.exited << " exited";
  return s.str();
}

Fiber& pick_ready(BlockState& b) {
  const size_t pick = b.rng.below(b.ready.size());
  Fiber& f = *t_worker->fibers[b.ready[pick]];
  b.ready[pick] = b.ready.back();
  b.ready.pop_back();
  return f;
}

// Runs one block to its end (or its first error) on the calling worker thread.
void run_block(Worker& worker, BlockState& b) {
  renew_tsan_fibers(worker);
  const dim3 bd = b.launch->block;
  b.threads = int(bd.x * bd.y * bd.z);
  b.warps.assign((b.threads + 31) / 32, WarpState{});
  while (worker.fibers.size() < size_t(b.threads)) {
    worker.fibers.emplace_back(new Fiber);
    worker.fibers.back()->allocate();
  }
  b.ready.clear();
  for (int t = 0; t < b.threads; ++t) {
    Fiber& f = *worker.fibers[t];
    f.tid = t;
    f.block = &b;
    f.coords = {{unsigned(t) % bd.x, unsigned(t) / bd.x % bd.y, unsigned(t) / (bd.x * bd.y)},
                b.block_idx,
                bd,
                b.launch->grid};
    f.sp = initial_frame(f.top());
    make_ready(b, f);
  }
  tsan_release(&b.tsan_start);
  // The fibers switch among themselves (yield_to_scheduler) and come back here once none is
  // ready: the block ended, failed, or is stuck.
  Fiber& first = pick_ready(b);
  t_fiber = &first;
  current = &first.coords;
  switch_to(&worker.scheduler_sp, first.sp, first.tsan);
  t_fiber = nullptr;
  current = nullptr;
  if (b.error.empty() && b.exited < b.threads) b.error = deadlock_report(b);
  tsan_acquire(&b.tsan_end);
}

// --- configuration, the launch log, kernel names ---

std::mutex g_state_mutex;
uint64_t g_seed = 0;
int g_workers = 3;
uint64_t g_launches_since_seed = 0;
std::map<std::string, LaunchRecord> g_log;
std::unordered_map<std::string, int> g_launch_bounds;

// Function symbols (offset -> name) of the ELF file `path`, from its .symtab: the kernels
// live in an anonymous namespace, which dladdr (the dynamic symbols only) does not see.
std::map<uintptr_t, std::string> function_symbols(const char* path) {
  std::map<uintptr_t, std::string> symbols;
  std::ifstream file(path, std::ios::binary);
  const std::vector<char> data((std::istreambuf_iterator<char>(file)),
                               std::istreambuf_iterator<char>());
  if (data.size() < sizeof(Elf64_Ehdr)) return symbols;
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(data.data());
  const auto* sections = reinterpret_cast<const Elf64_Shdr*>(data.data() + eh->e_shoff);
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sections[i].sh_type != SHT_SYMTAB) continue;
    const char* names = data.data() + sections[sections[i].sh_link].sh_offset;
    const auto* syms = reinterpret_cast<const Elf64_Sym*>(data.data() + sections[i].sh_offset);
    for (size_t k = 0; k < sections[i].sh_size / sizeof(Elf64_Sym); ++k)
      if (ELF64_ST_TYPE(syms[k].st_info) == STT_FUNC && syms[k].st_value != 0)
        symbols[syms[k].st_value] = names + syms[k].st_name;
  }
  return symbols;
}

std::string demangle(const std::string& mangled) {
  int status = 0;
  char* out = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
  std::string name = status == 0 && out != nullptr ? out : mangled;
  std::free(out);
  return name;
}

// "void ns::(anonymous namespace)::kernel<float, float, 4>(Args, int, bool)" ->
// "kernel<float, float, 4>": the kernel and its template arguments.
std::string kernel_instance(std::string name) {
  const std::string anon = "(anonymous namespace)";
  for (size_t at; (at = name.find(anon)) != std::string::npos;) name.replace(at, anon.size(), "{anon}");
  if (name.rfind("void ", 0) == 0) name = name.substr(5);
  int depth = 0;
  size_t end = name.size(), start = 0;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    if (c == '<') ++depth;
    if (c == '>') --depth;
    if (depth == 0 && c == '(') {
      end = i;
      break;
    }
    if (depth == 0 && c == ':' && i + 1 < name.size() && name[i + 1] == ':') start = i + 2;
  }
  return name.substr(start, end - start);
}

std::string kernel_name(const void* kernel) {
  static std::mutex m;
  static std::unordered_map<const void*, std::string> names;
  static std::map<std::string, std::map<uintptr_t, std::string>> files;
  std::lock_guard<std::mutex> lock(m);
  auto found = names.find(kernel);
  if (found != names.end()) return found->second;
  Dl_info info{};
  std::string name;
  if (dladdr(kernel, &info) != 0 && info.dli_fname != nullptr) {
    auto& symbols = files[info.dli_fname];
    if (symbols.empty()) symbols = function_symbols(info.dli_fname);
    const auto at = symbols.find(reinterpret_cast<uintptr_t>(kernel) -
                                 reinterpret_cast<uintptr_t>(info.dli_fbase));
    if (at != symbols.end()) name = kernel_instance(demangle(at->second));
  }
  if (name.empty()) {
    std::ostringstream s;
    s << "kernel@" << kernel;
    name = s.str();
  }
  return names[kernel] = name;
}

std::string base_name(const std::string& instance) { return instance.substr(0, instance.find('<')); }

std::string first_template_argument(const std::string& instance) {
  const size_t open = instance.find('<');
  if (open == std::string::npos) return "";
  size_t end = open + 1;
  for (int depth = 0; end < instance.size(); ++end) {
    const char c = instance[end];
    if (c == '<') ++depth;
    if (c == '>' && depth-- == 0) break;
    if (c == ',' && depth == 0) break;
  }
  return instance.substr(open + 1, end - open - 1);
}

std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// What a launch on sm_80 or sm_90 refuses (the limits of both are these), or "".
std::string launch_violation(const std::string& instance, dim3 grid, dim3 block,
                             size_t shared_mem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "an empty grid";
  if (grid.x > 2147483647u) return "gridDim.x above 2^31 - 1";
  if (grid.y > 65535 || grid.z > 65535) return "gridDim.y or gridDim.z above 65535";
  if (threads == 0) return "an empty block";
  if (block.x > 1024 || block.y > 1024 || block.z > 64)
    return "a block dimension above its limit (1024, 1024, 64)";
  if (threads > 1024) return "more than 1024 threads per block";
  const auto bound = g_launch_bounds.find(base_name(instance));
  if (bound != g_launch_bounds.end() && threads > uint64_t(bound->second))
    return "more threads per block than the kernel's __launch_bounds__ (" +
           std::to_string(bound->second) + ")";
  if (shared_mem > 48 * 1024)
    return "more than 48 KiB of dynamic shared memory (the limit without an opt-in)";
  return "";
}

// The worker threads, started on the first launch.
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // Runs every block of `launch` in the seeded order; returns the first error or "".
  std::string run(const Launch& launch, int workers) {
    const dim3 g = launch.grid;
    const uint64_t blocks = uint64_t(g.x) * g.y * g.z;
    std::vector<uint64_t> order(blocks);
    for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
    std::mt19937_64 rng(launch.seed);
    std::shuffle(order.begin(), order.end(), rng);
    std::unique_lock<std::mutex> lock(m_);
    while (int(threads_.size()) < workers)
      threads_.emplace_back([this, id = threads_.size()] { work(id); });
    job_ = &launch;
    order_ = std::move(order);
    next_ = 0;
    error_.clear();
    active_workers_ = workers;
    busy_ = workers;
    ++generation_;
    cv_.notify_all();
    done_.wait(lock, [this] { return busy_ == 0; });
    job_ = nullptr;
    return error_;
  }

 private:
  void work(size_t id) {
    const Untracked untracked;  // the scheduler's bookkeeping (see the top of the file)
    Worker worker;
    t_worker = &worker;
#if SPEM_EMU_TSAN
    worker.scheduler_tsan = __tsan_get_current_fiber();
#endif
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || (generation_ != seen && id < size_t(active_workers_)); });
      if (stop_) return;
      seen = generation_;
      const Launch& launch = *job_;
      while (next_ < order_.size() && error_.empty()) {
        const uint64_t linear = order_[next_++];
        lock.unlock();
        BlockState b;
        b.launch = &launch;
        const dim3 g = launch.grid;
        b.block_idx = {unsigned(linear % g.x), unsigned(linear / g.x % g.y),
                       unsigned(linear / (uint64_t(g.x) * g.y))};
        b.rng = Random(launch.seed ^ (0x9E3779B97F4A7C15ull * (linear + 1)));
        run_block(worker, b);
        lock.lock();
        if (!b.error.empty() && error_.empty()) error_ = b.error;
      }
      if (--busy_ == 0) done_.notify_all();
    }
  }

  std::mutex m_;
  std::condition_variable cv_, done_;
  std::vector<std::thread> threads_;
  const Launch* job_ = nullptr;
  std::vector<uint64_t> order_;
  size_t next_ = 0;
  std::string error_;
  int active_workers_ = 0, busy_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: its threads may outlive static destruction
  return *p;
}

}  // namespace

// --- the device-side calls ---

}  // namespace spem_emu

void __syncthreads() {
  using namespace spem_emu;
  const Untracked untracked;
  Fiber& f = *t_fiber;
  BlockState& b = *f.block;
  if (b.exited > 0) fail("__syncthreads() after " + std::to_string(b.exited) +
                         " threads of the block exited");
  const unsigned generation = b.barrier_generation;
  tsan_release(&b.tsan_barrier[generation & 1]);
  f.state = Fiber::kAtBarrier;
  if (++b.barrier_arrived == b.threads) {
    b.barrier_arrived = 0;
    ++b.barrier_generation;
    for (int t = 0; t < b.threads; ++t) {
      Fiber& other = *t_worker->fibers[t];
      if (other.state == Fiber::kAtBarrier) make_ready(b, other);
    }
  }
  yield_to_scheduler();
  tsan_acquire(&b.tsan_barrier[generation & 1]);
}

namespace spem_emu {

void shuffle_xor(unsigned mask, void* value, size_t size, int lane_mask, int width) {
  const Untracked untracked;
  Fiber& f = *t_fiber;
  BlockState& b = *f.block;
  if (mask != 0xffffffffu) fail("a shuffle with a partial mask (only full warps are emulated)");
  if (width != 32) fail("a shuffle of width " + std::to_string(width) + " (only 32 is emulated)");
  if (lane_mask < 0 || lane_mask > 31) fail("a shuffle lane mask outside 0..31");
  if (b.threads % 32 != 0) fail("a full-warp shuffle in a block whose last warp is partial");
  WarpState& w = b.warps[f.tid / 32];
  const int lane = f.tid % 32;
  if (w.exited > 0) fail("a full-warp shuffle after " + std::to_string(w.exited) +
                         " lanes of the warp exited");
  if (w.arrived == 0) {
    w.lane_mask = lane_mask;
    w.size = size;
  } else if (w.lane_mask != lane_mask || w.size != size) {
    fail("lanes of one warp at different shuffles (lane mask " + std::to_string(lane_mask) +
         " vs " + std::to_string(w.lane_mask) + ", " + std::to_string(size) + " vs " +
         std::to_string(w.size) + " bytes)");
  }
  const unsigned parity = w.parity;
  std::memcpy(&w.slots[parity][lane], value, size);
  f.state = Fiber::kAtShuffle;
  if (++w.arrived == 32) {
    w.arrived = 0;
    w.parity ^= 1;
    const int first = f.tid / 32 * 32;
    for (int t = first; t < first + 32; ++t) make_ready(b, *t_worker->fibers[t]);
  }
  yield_to_scheduler();
  std::memcpy(value, &w.slots[parity][lane ^ lane_mask], size);
}

cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t shared_mem,
                   std::function<void()> thread_body) {
  t_last_error.clear();
  const std::string instance = kernel_name(kernel);
  Launch l{kernel, instance, grid, block, std::move(thread_body), 0};
  int workers;
  {
    std::lock_guard<std::mutex> lock(g_state_mutex);
    const std::string violation = launch_violation(instance, grid, block, shared_mem);
    if (!violation.empty()) {
      t_last_error = "launch of " + instance + " with grid " + dims(grid) + " and block " +
                     dims(block) + ", " + std::to_string(shared_mem) +
                     " bytes of dynamic shared memory: " + violation;
      return cudaErrorInvalidConfiguration;
    }
    l.seed = g_seed * 0x100000001B3ull + g_launches_since_seed++;
    workers = g_workers;
    LaunchRecord& r = g_log[instance];
    r.kernel = base_name(instance);
    r.instance = instance;
    r.dtype = first_template_argument(instance);
    r.launches += 1;
    r.blocks += uint64_t(grid.x) * grid.y * grid.z;
    r.largest_grid = std::max<uint64_t>(r.largest_grid, uint64_t(grid.x) * grid.y * grid.z);
  }
  const std::string error = pool().run(l, workers);
  if (!error.empty()) {
    t_last_error = "in " + instance + " (grid " + dims(grid) + ", block " + dims(block) +
                   "): " + error;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

void set_schedule(uint64_t seed, int workers) {
  std::lock_guard<std::mutex> lock(g_state_mutex);
  g_seed = seed;
  g_workers = std::max(1, workers);
  g_launches_since_seed = 0;
}

std::vector<LaunchRecord> launch_log() {
  std::lock_guard<std::mutex> lock(g_state_mutex);
  std::vector<LaunchRecord> out;
  for (const auto& [name, r] : g_log) out.push_back(r);
  return out;
}

void clear_launch_log() {
  std::lock_guard<std::mutex> lock(g_state_mutex);
  g_log.clear();
}

void register_launch_bounds(std::initializer_list<std::pair<const char*, int>> bounds) {
  std::lock_guard<std::mutex> lock(g_state_mutex);
  for (const auto& [name, threads] : bounds) g_launch_bounds[name] = threads;
}

std::vector<std::string> compiled_instances() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<const void*>(&launch), &info) == 0 || info.dli_fname == nullptr)
    return {};
  std::vector<std::string> out;
  for (const auto& [offset, mangled] : function_symbols(info.dli_fname)) {
    const std::string demangled = demangle(mangled);
    if (demangled.rfind("void ", 0) == 0) out.push_back(kernel_instance(demangled));
  }
  return out;
}

std::map<std::string, int> launch_bounds() {
  std::lock_guard<std::mutex> lock(g_state_mutex);
  return {g_launch_bounds.begin(), g_launch_bounds.end()};
}

}  // namespace spem_emu
