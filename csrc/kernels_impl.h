// The bodies of the CPU kernels declared in kernels.h. Included once by each isa_*.cpp translation
// unit, with UEGUARD_ISA naming the namespace that keeps that ISA's copy apart (no #pragma once:
// every inclusion is a separate compilation of the same source). It includes no headers itself;
// kernels.h has included everything before any target pragma.
//
// Parallelism: at::parallel_for, which with PyTorch's OpenMP backend is an `omp parallel` region
// sized by torch.get_num_threads() (it runs inline when already inside a parallel region or below
// the grain size). Inner loops are `omp simd`, vectorised for the ISA the file is compiled for.

#ifndef UEGUARD_ISA
#error "define UEGUARD_ISA (the namespace of this copy) before including kernels_impl.h"
#endif

namespace ueguard {
namespace isa {
namespace UEGUARD_ISA {
namespace {

// Elements per reduction task (per-sample norms, quantisation statistics). Each sample is split
// into tasks of this size so that a batch of one large image still spreads over all threads;
// partial results are combined in a fixed order, so they do not depend on the thread count.
constexpr int64_t kChunk = 1 << 14;

// Elements below which a loop runs on one thread (ATen's own grain size for element-wise ops).
constexpr int64_t kGrain = 32768;

// Pixels per task of a channels-last write: the task computes each channel's block contiguously
// (vectorised), then interleaves the block into NHWC order.
constexpr int64_t kPixelBlock = 256;

// Adding then subtracting 1.5 * 2^23 rounds a float in [-2^22, 2^22] to the nearest integer, ties to
// even (the IEEE default rounding of the addition, where one ulp is 1). It matches torch.round and,
// unlike std::nearbyint, vectorises.
constexpr float kRoundMagic = 12582912.0f;

// clamp(v, lo, hi) with torch.clamp's semantics: NaN propagates (both comparisons are false).
inline float clamp(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// float → bfloat16 bits with c10::BFloat16's rounding (to nearest, ties to even; NaN → 0x7FC0),
// written without a branch so that it vectorises.
inline uint16_t to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint16_t rounded = static_cast<uint16_t>((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16);
  return v != v ? static_cast<uint16_t>(0x7FC0) : rounded;
}

template <NextType T>
struct Stored {
  using type = uint16_t;  // bfloat16 / float16 bits
};
template <>
struct Stored<NextType::Float> {
  using type = float;
};

template <NextType T>
inline typename Stored<T>::type convert(float v) {
  if constexpr (T == NextType::Float) {
    return v;
  } else if constexpr (T == NextType::BFloat16) {
    return to_bf16(v);
  } else {
    return c10::Half(v).x;
  }
}

// Runs `elem(i, sample)` for every flat (contiguous NCHW) index i, where elem writes the step's
// delta output at i and returns x[i] + delta'[i]; that value is stored, converted to T, in the
// next-input tensor when one is requested.
template <NextType T, typename Elem>
void run_elementwise_typed(int64_t numel, int64_t per_sample, const NextInput& next, const Elem& elem) {
  using Out = typename Stored<T>::type;
  Out* const dst = static_cast<Out*>(next.data);
  if (T == NextType::None || !next.channels_last) {
    // Segments never cross a sample boundary, so `sample` is constant in the vectorised loop.
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t lo = begin; lo < end;) {
        const int64_t sample = lo / per_sample;
        const int64_t hi = std::min(end, (sample + 1) * per_sample);
        if constexpr (T == NextType::None) {
#pragma omp simd
          for (int64_t i = lo; i < hi; ++i) elem(i, sample);
        } else {
#pragma omp simd
          for (int64_t i = lo; i < hi; ++i) dst[i] = convert<T>(elem(i, sample));
        }
        lo = hi;
      }
    });
    return;
  }
  // Channels-last: NCHW (n, c, p) → NHWC n*C*HW + p*C + c. A task is one block of pixels of one
  // sample: every channel's run is computed contiguously into a buffer, then interleaved.
  if constexpr (T != NextType::None) {
    const int64_t channels = next.channels, plane = next.plane;
    const int64_t n_samples = numel / (channels * plane);
    const int64_t blocks = (plane + kPixelBlock - 1) / kPixelBlock;
    const int64_t grain = std::max<int64_t>(1, kGrain / (kPixelBlock * channels));
    at::parallel_for(0, n_samples * blocks, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(channels * kPixelBlock);
      float* const tmp = buffer.data();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, p0 = (task % blocks) * kPixelBlock;
        const int64_t len = std::min(kPixelBlock, plane - p0);
        const int64_t sample = (n * channels * plane) / per_sample;
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t base = (n * channels + c) * plane + p0;
          float* const row = tmp + c * kPixelBlock;
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) row[p] = elem(base + p, sample);
        }
        Out* const out = dst + (n * plane + p0) * channels;
        if (channels == 3) {
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) {
            out[3 * p] = convert<T>(tmp[p]);
            out[3 * p + 1] = convert<T>(tmp[kPixelBlock + p]);
            out[3 * p + 2] = convert<T>(tmp[2 * kPixelBlock + p]);
          }
        } else {
          for (int64_t p = 0; p < len; ++p)
            for (int64_t c = 0; c < channels; ++c) out[p * channels + c] = convert<T>(tmp[c * kPixelBlock + p]);
        }
      }
    });
  }
}

template <typename Elem>
void run_elementwise(int64_t numel, int64_t per_sample, const NextInput& next, const Elem& elem) {
  if (numel == 0) return;
  switch (next.type) {
    case NextType::None:
      return run_elementwise_typed<NextType::None>(numel, per_sample, next, elem);
    case NextType::Float:
      return run_elementwise_typed<NextType::Float>(numel, per_sample, next, elem);
    case NextType::BFloat16:
      return run_elementwise_typed<NextType::BFloat16>(numel, per_sample, next, elem);
    case NextType::Half:
      return run_elementwise_typed<NextType::Half>(numel, per_sample, next, elem);
  }
}

// Per sample, the sum of value(i, sample)^2 over its elements. Within a task of kChunk elements,
// element i is added to float32 lane i % kLanes (independent accumulation chains that vectorise at
// any width; the lane of an element does not depend on the ISA, so neither does the result), and
// the lanes are flushed into a float64 sum every kFlush elements, keeping each float32 partial
// short. Tasks are combined in task order (deterministic for any thread count).
constexpr int64_t kLanes = 32;
constexpr int64_t kFlush = 2048;

template <typename Value>
std::vector<double> per_sample_sum_sq(int64_t n_samples, int64_t per_sample, const Value& value) {
  std::vector<double> sums(n_samples, 0.0);
  if (n_samples == 0 || per_sample == 0) return sums;
  const int64_t chunks = (per_sample + kChunk - 1) / kChunk;
  std::vector<double> partial(n_samples * chunks);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::min(per_sample, kChunk));
  at::parallel_for(0, n_samples * chunks, grain, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t sample = task / chunks;
      const int64_t lo = sample * per_sample + (task % chunks) * kChunk;
      const int64_t hi = std::min(lo + kChunk, (sample + 1) * per_sample);
      double sum = 0.0;
      for (int64_t block = lo; block < hi; block += kFlush) {
        const int64_t block_end = std::min(hi, block + kFlush);
        float lanes[kLanes] = {};
        int64_t i = block;
        for (; i + kLanes <= block_end; i += kLanes) {
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) {
            const float v = value(i + l, sample);
            lanes[l] += v * v;
          }
        }
        for (int64_t l = 0; i < block_end; ++i, ++l) {
          const float v = value(i, sample);
          lanes[l] += v * v;
        }
        for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
      }
      partial[task] = sum;
    }
  });
  for (int64_t sample = 0; sample < n_samples; ++sample)
    for (int64_t c = 0; c < chunks; ++c) sums[sample] += partial[sample * chunks + c];
  return sums;
}

// One signed-gradient step, then projection onto {|d| <= bound} ∩ {0 <= x + d <= 1}:
//   d = clamp(delta - step * sign(grad), -bound, bound);  out = clamp(x + d, 0, 1) - x
// (step already carries the direction). sign(0) = sign(NaN) = 0 as in torch.sign.
void linf_step(const float* dp, const float* gp, const float* xp, float* o, int64_t numel, float step, float bound,
               const NextInput& next) {
  run_elementwise(numel, numel, next, [=](int64_t i, int64_t) {
    const float g = gp[i];
    const float s = static_cast<float>((g > 0.0f) - (g < 0.0f));
    const float d = clamp(dp[i] - step * s, -bound, bound);
    const float xi = xp[i];
    const float r = clamp(xi + d, 0.0f, 1.0f) - xi;
    o[i] = r;
    return xi + r;
  });
}

// One normalised-gradient step on an L2-bounded perturbation per sample n:
//   scale_n = step / ||grad_n||  (0 where the gradient is 0);  d_n = delta_n - scale_n grad_n
//   d_n *= min(1, bound / ||d_n||);  out = clamp(x + d, 0, 1) - x
// The norms are accumulated as per_sample_sum_sq describes and rounded to float32 once.
void l2_step(const float* dp, const float* gp, const float* xp, float* o, int64_t n_samples, int64_t per_sample,
             float step, float bound, const NextInput& next) {
  if (n_samples == 0 || per_sample == 0) return;
  const std::vector<double> grad_sq = per_sample_sum_sq(n_samples, per_sample, [=](int64_t i, int64_t) { return gp[i]; });
  std::vector<float> scale(n_samples);
  for (int64_t n = 0; n < n_samples; ++n) {
    const float norm = static_cast<float>(std::sqrt(grad_sq[n]));
    scale[n] = norm > 0.0f ? step / norm : 0.0f;
  }
  const float* sp = scale.data();
  const std::vector<double> step_sq =
      per_sample_sum_sq(n_samples, per_sample, [=](int64_t i, int64_t n) { return dp[i] - sp[n] * gp[i]; });
  std::vector<float> factor(n_samples);
  for (int64_t n = 0; n < n_samples; ++n) {
    const float norm = static_cast<float>(std::sqrt(step_sq[n]));
    factor[n] = norm > bound ? bound / norm : 1.0f;
  }
  const float* fp = factor.data();
  run_elementwise(n_samples * per_sample, per_sample, next, [=](int64_t i, int64_t n) {
    const float d = (dp[i] - sp[n] * gp[i]) * fp[n];
    const float xi = xp[i];
    const float r = clamp(xi + d, 0.0f, 1.0f) - xi;
    o[i] = r;
    return xi + r;
  });
}

// out[i] = clamp(round_half_even(image[i] + 255 delta[i]), 0, 255); per sample the largest level
// change and the exact int64 sum of squared level changes (divided once by 255^2).
void quantize(const uint8_t* ip, const float* dp, uint8_t* op_out, int64_t n_samples, int64_t per_sample,
              float* linf, double* sq_err) {
  const int64_t chunks = std::max<int64_t>(1, (per_sample + kChunk - 1) / kChunk);
  const int64_t n_tasks = n_samples * chunks;
  std::vector<int32_t> task_max(n_tasks);
  std::vector<int64_t> task_sq(n_tasks);
  const int64_t task_elems = std::max<int64_t>(1, std::min(per_sample, kChunk));
  const int64_t grain = std::max<int64_t>(1, kGrain / task_elems);
  int32_t* const max_out = task_max.data();
  int64_t* const sq_out = task_sq.data();
  at::parallel_for(0, n_tasks, grain, [&](int64_t task_begin, int64_t task_end) {
    // Local copies: a uint8 store may alias anything, including the closure, so pointers read
    // through it would be reloaded every iteration, which defeats vectorisation.
    const uint8_t* const in = ip;
    const float* const delta = dp;
    uint8_t* const out = op_out;
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t sample = task / chunks;
      const int64_t lo = sample * per_sample + (task % chunks) * kChunk;
      const int64_t hi = std::min(lo + kChunk, (sample + 1) * per_sample);
      // A task's sum fits int32 (kChunk * 255^2 < 2^31), which vectorises where int64 does not.
      static_assert(kChunk * 255 * 255 < (int64_t{1} << 31), "per-task squared error must fit int32");
      int32_t max_diff = 0;
      int32_t sum_sq = 0;
#pragma omp simd reduction(max : max_diff) reduction(+ : sum_sq)
      for (int64_t i = lo; i < hi; ++i) {
        const int32_t level = in[i];
        // round(clamp(v, 0, 255)) == clamp(round(v), 0, 255) because the bounds are integers.
        const float v = clamp(static_cast<float>(level) + 255.0f * delta[i], 0.0f, 255.0f);
        const int32_t q = static_cast<int32_t>((v + kRoundMagic) - kRoundMagic);
        out[i] = static_cast<uint8_t>(q);
        const int32_t diff = q - level;
        const int32_t abs_diff = diff < 0 ? -diff : diff;
        max_diff = abs_diff > max_diff ? abs_diff : max_diff;
        sum_sq += diff * diff;
      }
      max_out[task] = max_diff;
      sq_out[task] = sum_sq;
    }
  });
  for (int64_t sample = 0; sample < n_samples; ++sample) {
    int32_t max_diff = 0;
    int64_t sum_sq = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      max_diff = std::max(max_diff, task_max[sample * chunks + c]);
      sum_sq += task_sq[sample * chunks + c];
    }
    linf[sample] = static_cast<float>(max_diff);
    sq_err[sample] = static_cast<double>(sum_sq) / (255.0 * 255.0);
  }
}

}  // namespace

const Kernels& table(const char* name) {
  static const Kernels kernels{name, &linf_step, &l2_step, &quantize};
  return kernels;
}

}  // namespace UEGUARD_ISA
}  // namespace isa
}  // namespace ueguard
