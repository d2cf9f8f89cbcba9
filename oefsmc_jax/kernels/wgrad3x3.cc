// Filter gradient of a 3x3 convolution with padding 1 (NHWC input, HWIO kernel), as an XLA FFI handler for the CPU.
//
//   dW[kh, kw, ci, co] = sum_{n, oh, ow} x[n, oh*s - 1 + kh, ow*s - 1 + kw, ci] * dy[n, oh, ow, co]
//
// Why: XLA:CPU's filter-gradient convolutions at the small channel counts of pruned CIFAR ResNets run at 10-30
// GFLOP/s (4x PyTorch/oneDNN, benchmarks/README.md). This kernel keeps a 3 (kw) x 4 (ci) tile of 8-wide (co)
// accumulators in registers while it walks the output positions of one image, so every dy vector loaded feeds 12
// fused multiply-adds, and every image (zero-padded copy of x, dy) stays in cache for all passes over it.
// Images are split into up to 4 chunks per thread of XLA's intra-op pool (the FFI ThreadPool); the calling thread
// and the pool's threads claim chunks until none is left, so a busy or oversubscribed pool (a run pinned to one
// core) costs no idle spinning: the caller does whatever nobody else has started, then sleeps until the chunks in
// flight are done. Each chunk sums into its own buffer and the chunks are added in a fixed order, so the result
// does not depend on thread timing or on which thread ran which chunk.
// Compiled on first use by oefsmc_jax/kernels/cpu_conv.py (g++/clang++ -O3 -march=native).
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
typedef float v8 __attribute__((vector_size(32)));

namespace {

// One image: xp is its zero-padded input (Hp, Wp, Ci4), d its output gradient (Ho, Wo, Co8); acc is (3, 3, Ci4, Co8).
void image_accum(const float* xp, const float* d, float* acc, int64_t Wp, int64_t Ci4, int64_t Ho, int64_t Wo,
                 int64_t Co8, int64_t s) {
  for (int64_t cb = 0; cb < Co8; cb += 8)
    for (int kh = 0; kh < 3; ++kh)
      for (int64_t c0 = 0; c0 < Ci4; c0 += 4) {
        v8 a[3][4];
        for (int kw = 0; kw < 3; ++kw)
          for (int j = 0; j < 4; ++j) std::memcpy(&a[kw][j], acc + ((kh * 3 + kw) * Ci4 + c0 + j) * Co8 + cb, 32);
        for (int64_t oh = 0; oh < Ho; ++oh) {
          const float* xr = xp + ((oh * s + kh) * Wp) * Ci4 + c0;
          const float* dr = d + (oh * Wo) * Co8 + cb;
          for (int64_t ow = 0; ow < Wo; ++ow) {
            v8 dv;
            std::memcpy(&dv, dr + ow * Co8, 32);
            const float* xv = xr + (ow * s) * Ci4;
#pragma GCC unroll 3
            for (int kw = 0; kw < 3; ++kw) {
              const float* xk = xv + kw * Ci4;
              a[kw][0] += xk[0] * dv;
              a[kw][1] += xk[1] * dv;
              a[kw][2] += xk[2] * dv;
              a[kw][3] += xk[3] * dv;
            }
          }
        }
        for (int kw = 0; kw < 3; ++kw)
          for (int j = 0; j < 4; ++j) std::memcpy(acc + ((kh * 3 + kw) * Ci4 + c0 + j) * Co8 + cb, &a[kw][j], 32);
      }
}

struct Job {
  const float* x;
  const float* dy;
  int64_t N, H, W, Ci, Ho, Wo, Co, Ci4, Co8, s, K;
  int chunks;
  std::vector<float> part;  // chunks x K partial sums
  std::atomic<int> next{0}, done{0};
  std::mutex mu;
  std::condition_variable all_done;

  void run_chunk(int c) {
    const int64_t n0 = N * c / chunks, n1 = N * (c + 1) / chunks, Hp = H + 2, Wp = W + 2;
    float* acc = part.data() + static_cast<size_t>(c) * K;
    std::vector<float> xp(static_cast<size_t>(Hp * Wp * Ci4), 0.f), dp;
    if (Co8 != Co) dp.assign(static_cast<size_t>(Ho * Wo * Co8), 0.f);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          std::memcpy(&xp[((h + 1) * Wp + w + 1) * Ci4], x + ((n * H + h) * W + w) * Ci, Ci * sizeof(float));
      const float* d = dy + n * Ho * Wo * Co;
      if (Co8 != Co) {
        for (int64_t p = 0; p < Ho * Wo; ++p) std::memcpy(&dp[p * Co8], d + p * Co, Co * sizeof(float));
        d = dp.data();
      }
      image_accum(xp.data(), d, acc, Wp, Ci4, Ho, Wo, Co8, s);
    }
  }

  // Claim chunks until none is left (the caller and every scheduled task run this; a task that starts late
  // finds nothing to do).
  void work() {
    for (int c; (c = next.fetch_add(1)) < chunks;) {
      run_chunk(c);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }

  void wait() {
    std::unique_lock<std::mutex> lock(mu);
    all_done.wait(lock, [this] { return done.load(std::memory_order_acquire) == chunks; });
  }
};

ffi::Error WgradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                     ffi::ResultBuffer<ffi::F32> dw, int64_t stride) {
  auto xd = x.dimensions();
  auto dd = dy.dimensions();
  auto wd = dw->dimensions();
  if (xd.size() != 4 || dd.size() != 4 || wd.size() != 4 || xd[0] != dd[0] || wd[0] != 3 || wd[1] != 3 ||
      wd[2] != xd[3] || wd[3] != dd[3] || stride < 1 || dd[1] != (xd[1] - 1) / stride + 1 ||
      dd[2] != (xd[2] - 1) / stride + 1)
    return ffi::Error::InvalidArgument("oefsmc_wgrad3x3: shapes do not match a 3x3, padding-1 convolution");
  auto job = std::make_shared<Job>();
  Job& j = *job;
  j.x = x.typed_data();
  j.dy = dy.typed_data();
  j.N = xd[0]; j.H = xd[1]; j.W = xd[2]; j.Ci = xd[3];
  j.Ho = dd[1]; j.Wo = dd[2]; j.Co = dd[3]; j.s = stride;
  j.Ci4 = (j.Ci + 3) / 4 * 4;
  j.Co8 = (j.Co + 7) / 8 * 8;
  j.K = 9 * j.Ci4 * j.Co8;
  int64_t T = pool.num_threads();
  if (T < 1) T = 1;
  int64_t C = 4 * T;
  if (C > j.N) C = j.N;
  if (C < 1) C = 1;
  j.chunks = static_cast<int>(C);
  j.part.assign(static_cast<size_t>(C * j.K), 0.f);
  for (int64_t t = 1; t < T && t < C; ++t) pool.Schedule([job]() { job->work(); });
  j.work();
  j.wait();
  float* out = dw->typed_data();
  for (int64_t k = 0; k < 9; ++k)
    for (int64_t ci = 0; ci < j.Ci; ++ci)
      for (int64_t co = 0; co < j.Co; ++co) {
        float s = 0.f;
        for (int t = 0; t < j.chunks; ++t) s += j.part[static_cast<size_t>(t) * j.K + (k * j.Ci4 + ci) * j.Co8 + co];
        out[(k * j.Ci + ci) * j.Co + co] = s;
      }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OefsmcWgrad3x3, WgradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));
