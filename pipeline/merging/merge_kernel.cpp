// One pass over a block of rows for mergekit's elementwise merges (TIES and task arithmetic at density 1, linear),
// reproducing mergekit 0.1.5's torch operations bit for bit on the CPU.
//
// mergekit's GeneralizedTaskArithmeticMerge.merge_group makes about ten passes over N+1 tensors; every torch op on a
// bfloat16/float16 tensor computes in float32 and rounds to the tensor's dtype (D) once. This kernel computes, per
// element, the same values with the same roundings (every value is held in float32, and `round_to<D>` is applied
// exactly where torch writes a D tensor):
//
//   delta_s  = D(x_s - base)                          entry.tensor - base
//   p_i      = D(delta_s(i) * w_i)                    deltas.mul_(weights), w_i = D(weight_i)
//   TIES:  sign_sum = D(Σ_i p_i)                      deltas.sum(dim=0) (get_mask, method "sum")
//          keep_i   = sign(p_i) == (sign_sum >= 0 ? 1 : -1)   (sign(0) = sign(NaN) = 0: never kept)
//          mixed    = D(Σ_i (keep_i ? p_i : p_i * 0)) (deltas * mask).sum(dim=0)
//          divisor  = D(Σ_i (keep_i ? w_i : w_i * 0)), 0 → 1
//   task arithmetic: mixed = D(Σ_i p_i), divisor = D(Σ_i w_i) computed by torch in Python (one scalar)
//   normalize: mixed = D(mixed / divisor); lambda != 1: mixed = D(mixed * float(lambda))
//   result   = D(base + mixed), then cast to the output dtype
//
// D is the inputs' promoted dtype (mergekit's `promoted_dtype`), so every stored input is exact in it. int8_mask only
// changes the dtype the signs are compared in (-1, 0, 1 either way), not the mask; lambda is float32(lambda), as
// torch multiplies a tensor by a Python float.
//
// The float32 sums over the models follow ATen's cascade_sum (SumKernel.cpp) for a [N, numel] tensor reduced over
// dim 0 on one thread: the first `cascade_columns` columns are summed by multi_row_sum (a running sum, in chunks of
// 16 rows and more when N > 16), the rest by row_sum (four interleaved partial sums). Which columns take which path
// depends on torch's vector width; pipeline/merging/kernel.py measures it with torch itself and passes it in.
//
// linear (mergekit's linear_merge): result = float32 0; for each input, result = result + x_i * c_i with c_i =
// float32(weight_i) (torch's addcmul_, one fused multiply-add where torch's build contracts it, which kernel.py
// measures); normalize divides by the float32 sum of the weights (computed by torch in Python); then rounds to D.
//
// Adapted inputs can be given as the target's rows plus a LoRA product: D(A(target + float32(product * scale))),
// the apply stage's `target32 + scale·(B@A)` rounded to the adapted dtype A and then to the merge dtype D, so the
// adapted tensors are never materialized.
//
// Build flags matter for exactness: no -ffast-math (it would drop signed zeros, NaN semantics and subnormals), and
// -ffp-contract=off so that no a*b+c is fused unless written as std::fma. Every loop over the models is written in
// their order; the compiler vectorizes across elements only, which cannot reorder a sum.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <utility>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME ftmerge_merge_kernel
#endif
#define FTMERGE_CONCAT(a, b) a##b
#define FTMERGE_INIT(name) FTMERGE_CONCAT(PyInit_, name)
#define FTMERGE_STRING(name) #name
#define FTMERGE_NAME(name) FTMERGE_STRING(name)

namespace {

enum Dtype : int { F32 = 0, BF16 = 1, F16 = 2 };
enum Method : int { TIES = 0, TASK_ARITHMETIC = 1, LINEAR = 2 };

// Elements per step: every intermediate of a step (a few arrays per model) stays in the L1/L2 caches.
constexpr int CHUNK = 512;

inline uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float float_of(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// c10::BFloat16's round-to-nearest-even; a NaN becomes a quiet NaN (torch's own NaN bits differ between its scalar
// and vector paths, so only NaN-ness is part of the contract).
inline float round_bfloat16(float value) {
  const uint32_t bits = bits_of(value);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  return value != value ? float_of(0x7fc00000u) : float_of(rounded);
}

// IEEE round-to-nearest-even to float16 (as torch's F16C and c10 conversions), written with float32 and integer
// operations only so that the compiler vectorizes it: halves below 2^-14 are multiples of 2^-24, which adding and
// removing 0.5 (whose ulp is 2^-24) rounds to; normal halves keep 10 of float32's 23 fraction bits; above 65504 (the
// largest half) the value becomes infinite.
inline float round_float16(float value) {
  const uint32_t bits = bits_of(value);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t magnitude_bits = bits ^ sign;
  const float magnitude = float_of(magnitude_bits);
  const float subnormal = (magnitude + 0.5f) - 0.5f;
  const float normal = float_of((magnitude_bits + 0xfffu + ((magnitude_bits >> 13) & 1u)) & 0xffffe000u);
  const float finite = magnitude < 0x1p-14f ? subnormal : normal;
  const float rounded = finite > 65504.0f ? INFINITY : finite;
  const uint32_t result = magnitude_bits > 0x7f800000u ? 0x7fc00000u : bits_of(rounded);  // NaN stays NaN
  return float_of(result | sign);
}

template <int D>
inline float round_to(float value) {
  if constexpr (D == BF16) {
    return round_bfloat16(value);
  } else if constexpr (D == F16) {
    return round_float16(value);
  } else {
    return value;
  }
}

void round_array(int dtype, int count, float* values) {
  if (dtype == BF16) {
    for (int k = 0; k < count; ++k) values[k] = round_bfloat16(values[k]);
  } else if (dtype == F16) {
    for (int k = 0; k < count; ++k) values[k] = round_float16(values[k]);
  }
}

void load_floats(const void* data, int dtype, int64_t start, int count, float* out) {
  if (dtype == F32) {
    const float* in = static_cast<const float*>(data) + start;
    for (int k = 0; k < count; ++k) out[k] = in[k];
  } else if (dtype == BF16) {
    const uint16_t* in = static_cast<const uint16_t*>(data) + start;
    for (int k = 0; k < count; ++k) out[k] = float_of(static_cast<uint32_t>(in[k]) << 16);
  } else {
    const uint16_t* in = static_cast<const uint16_t*>(data) + start;
    int k = 0;
#if defined(__F16C__)
    for (; k + 8 <= count; k += 8)
      _mm256_storeu_ps(out + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + k))));
#endif
    for (; k < count; ++k) {
      _Float16 half;
      std::memcpy(&half, in + k, sizeof half);
      out[k] = static_cast<float>(half);
    }
  }
}

// Values already rounded to `dtype` (or rounded here), stored in it.
void store_floats(const float* values, int dtype, int64_t start, int count, void* data) {
  if (dtype == F32) {
    float* out = static_cast<float*>(data) + start;
    for (int k = 0; k < count; ++k) out[k] = values[k];
  } else if (dtype == BF16) {
    uint16_t* out = static_cast<uint16_t*>(data) + start;
    for (int k = 0; k < count; ++k) out[k] = static_cast<uint16_t>(bits_of(round_bfloat16(values[k])) >> 16);
  } else {
    uint16_t* out = static_cast<uint16_t*>(data) + start;
    int k = 0;
#if defined(__F16C__)
    for (; k + 8 <= count; k += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                       _mm256_cvtps_ph(_mm256_loadu_ps(values + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; k < count; ++k) {
      const _Float16 half = static_cast<_Float16>(values[k]);
      std::memcpy(out + k, &half, sizeof half);
    }
  }
}

// One input as mergekit receives it: `values` in `dtype`, plus, for an adapted model computed on the fly, the LoRA
// product B@A of the same rows (float32) and its scale; rounded to `via_dtype` (the adapted dtype) and then to the
// merge dtype.
struct Source {
  const void* values;
  int dtype;
  const float* product;
  float scale;
  int via_dtype;
};

struct Plan {
  int method;
  int dtype;
  int out_dtype;
  int64_t numel;
  int64_t cascade_columns;
  void* out;
  const void* base;
  int base_dtype;
  std::vector<Source> sources;
  std::vector<int> input_source;
  std::vector<float> input_weight;
  bool normalize;
  bool apply_lambda;
  float lambda;
  float divisor;
  bool fused_multiply_add;
  // Distinct (source, weight) pairs: equal inputs with equal weights share one product. A source with a single
  // product (`single_product[j]` >= 0) goes straight to it; the others keep their delta for each of their products.
  std::vector<int> product_source;
  std::vector<float> product_weight;
  std::vector<int> input_product;
  std::vector<int> single_product;
};

int ceil_log2(int64_t value) {
  int result = 0;
  while ((int64_t(1) << result) < value) ++result;
  return result;
}

// ATen's multi_row_sum for one column range [k0, k1), for `Outputs` sums at once: rows summed in order into
// acc[0], flushed up a level every level_step rows; `add_row(i, k0, k1, destinations)` adds row i's terms to each
// output. Sums start at +0 as ATen's do. A level not used yet holds +0, and a sum that starts at +0 is never -0, so
// adding it is skipped and adding into it is a copy: the same values in fewer passes.
template <int Outputs, class AddRow>
void cascade_sum(int64_t rows, int k0, int k1, float* const* out, float* levels, AddRow&& add_row) {
  constexpr int kLevels = 4;
  const int level_power = std::max(4, ceil_log2(rows) / kLevels);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  float* acc[kLevels][Outputs];
  for (int o = 0; o < Outputs; ++o) {
    acc[0][o] = out[o];
    for (int level = 1; level < kLevels; ++level) acc[level][o] = levels + ((level - 1) * Outputs + o) * CHUNK;
    for (int k = k0; k < k1; ++k) acc[0][o][k] = 0.0f;
  }
  bool used[kLevels] = {true, false, false, false};
  int64_t i = 0;
  while (i + level_step <= rows) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_row(i, k0, k1, acc[0]);
    for (int j = 1; j < kLevels; ++j) {
      for (int o = 0; o < Outputs; ++o) {
        float* __restrict upper = acc[j][o];
        float* __restrict lower = acc[j - 1][o];
        if (used[j]) {
          for (int k = k0; k < k1; ++k) upper[k] += lower[k];
        } else {
          for (int k = k0; k < k1; ++k) upper[k] = lower[k];
        }
        for (int k = k0; k < k1; ++k) lower[k] = 0.0f;
      }
      used[j] = true;
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < rows; ++i) add_row(i, k0, k1, acc[0]);
  for (int j = 1; j < kLevels; ++j)
    if (used[j])
      for (int o = 0; o < Outputs; ++o)
        for (int k = k0; k < k1; ++k) acc[0][o][k] += acc[j][o][k];
}

// ATen's row_sum: rows 4i+part go to four partial sums (each a multi_row_sum over rows/4), the remaining rows to
// the first, then the partials are added in order.
template <int Outputs, class AddRow>
void interleaved_sum(int64_t rows, int k0, int k1, float* const* out, float* partials, float* levels,
                     AddRow&& add_row) {
  const int64_t per_part = rows / 4;
  float* part_sums[4][Outputs];
  for (int o = 0; o < Outputs; ++o) {
    part_sums[0][o] = out[o];
    for (int part = 1; part < 4; ++part) part_sums[part][o] = partials + ((part - 1) * Outputs + o) * CHUNK;
  }
  for (int part = 0; part < 4; ++part) {
    cascade_sum<Outputs>(per_part, k0, k1, part_sums[part], levels,
                         [&](int64_t i, int a, int b, float* const* destinations) {
                           add_row(4 * i + part, a, b, destinations);
                         });
  }
  for (int64_t i = per_part * 4; i < rows; ++i) add_row(i, k0, k1, out);
  for (int part = 1; part < 4; ++part)
    for (int o = 0; o < Outputs; ++o)
      for (int k = k0; k < k1; ++k) out[o][k] += part_sums[part][o][k];
}

constexpr int kMaxOutputs = 2;

struct Scratch {
  std::vector<float> memory;
  float* base;
  float* values;
  float* sum;
  float* mixed;
  float* divisor;
  float* majority;
  float* partials;  // 3 per output
  float* levels;    // 3 per output
  float* deltas;    // one array per source
  float* products;  // one array per distinct product

  Scratch(int sources, int products_count)
      : memory(static_cast<size_t>(CHUNK) * (6 + 6 * kMaxOutputs + sources + products_count)) {
    float* next = memory.data();
    auto take = [&next](int arrays) {
      float* start = next;
      next += static_cast<size_t>(CHUNK) * arrays;
      return start;
    };
    base = take(1);
    values = take(1);
    sum = take(1);
    mixed = take(1);
    divisor = take(1);
    majority = take(1);
    partials = take(3 * kMaxOutputs);
    levels = take(3 * kMaxOutputs);
    deltas = take(sources);
    products = take(products_count);
  }
};

// Sums `add_row` over the inputs for every column of the chunk, each column in the order torch uses for it.
template <int Outputs, class AddRow>
void sum_inputs(const Plan& plan, int64_t start, int count, float* const* out, Scratch& scratch, AddRow&& add_row) {
  const int64_t rows = static_cast<int64_t>(plan.input_source.size());
  const int split = static_cast<int>(std::clamp<int64_t>(plan.cascade_columns - start, 0, count));
  if (split > 0) cascade_sum<Outputs>(rows, 0, split, out, scratch.levels, add_row);
  if (split < count) interleaved_sum<Outputs>(rows, split, count, out, scratch.partials, scratch.levels, add_row);
}

// How a source's loaded values become mergekit's input: as they are (D is the inputs' promoted dtype, so every
// stored input is exact in it), or an adapted model's target + product·scale rounded to its dtype (Via) and then to
// the merge dtype (kernel.py passes adapted rows only where that is their load dtype or wider).
enum SourceKind : int { STORED = 0, ADAPTED = 1 };

// delta = D(input - base), and with `Weighted` the product D(delta * weight): one pass per source.
template <int D, int Kind, int Via, bool Weighted>
void source_deltas(const float* __restrict values, const float* __restrict lora, float scale,
                   const float* __restrict base, float weight, int count, float* __restrict out) {
  for (int k = 0; k < count; ++k) {
    float value = values[k];
    if constexpr (Kind == ADAPTED) {
      const float update = lora[k] * scale;
      value = round_to<Via>(value + update);
      if constexpr (Via != D) value = round_to<D>(value);
    }
    float delta = round_to<D>(value - base[k]);
    if constexpr (Weighted) delta = round_to<D>(delta * weight);
    out[k] = delta;
  }
}

template <int D, int Kind, bool Weighted>
void source_deltas_via(int via, const float* values, const float* lora, float scale, const float* base, float weight,
                       int count, float* out) {
  switch (via) {
    case BF16:
      source_deltas<D, Kind, BF16, Weighted>(values, lora, scale, base, weight, count, out);
      break;
    case F16:
      source_deltas<D, Kind, F16, Weighted>(values, lora, scale, base, weight, count, out);
      break;
    default:
      source_deltas<D, Kind, F32, Weighted>(values, lora, scale, base, weight, count, out);
  }
}

template <int D, bool Weighted>
void source_deltas_of(const Source& source, const float* values, int64_t start, const float* base, float weight,
                      int count, float* out) {
  if (source.product != nullptr) {
    source_deltas_via<D, ADAPTED, Weighted>(source.via_dtype, values, source.product + start, source.scale, base,
                                            weight, count, out);
  } else {
    source_deltas<D, STORED, D, Weighted>(values, nullptr, 1.0f, base, weight, count, out);
  }
}

// TIES keeps a delta whose sign (0 for ±0 and NaN) equals the majority sign `majority` (+1 where the sum is >= 0,
// else -1): exactly when their product is > 0 (multiplying by ±1 is exact; ±0 and NaN give false).
inline bool kept(float majority, float product) { return product * majority > 0.0f; }

template <int D>
void task_arithmetic_chunk(const Plan& plan, int64_t start, int count, Scratch& s) {
  load_floats(plan.base, plan.base_dtype, start, count, s.base);
  const void* loaded = nullptr;  // adapted models share the target's rows: loaded once
  int loaded_dtype = -1;
  for (size_t j = 0; j < plan.sources.size(); ++j) {
    const Source& source = plan.sources[j];
    if (source.values != loaded || source.dtype != loaded_dtype) {
      load_floats(source.values, source.dtype, start, count, s.values);
      loaded = source.values;
      loaded_dtype = source.dtype;
    }
    const int single = plan.single_product[j];
    if (single >= 0) {
      source_deltas_of<D, true>(source, s.values, start, s.base, plan.product_weight[single], count,
                                s.products + static_cast<size_t>(single) * CHUNK);
    } else {
      source_deltas_of<D, false>(source, s.values, start, s.base, 1.0f, count, s.deltas + j * CHUNK);
    }
  }
  for (size_t q = 0; q < plan.product_source.size(); ++q) {
    const int source = plan.product_source[q];
    if (plan.single_product[source] >= 0) continue;
    const float* __restrict delta = s.deltas + static_cast<size_t>(source) * CHUNK;
    const float weight = plan.product_weight[q];
    float* __restrict product = s.products + q * CHUNK;
    for (int k = 0; k < count; ++k) product[k] = round_to<D>(delta[k] * weight);
  }
  auto product_of = [&](int64_t i) { return s.products + static_cast<size_t>(plan.input_product[i]) * CHUNK; };
  float* __restrict mixed = s.mixed;
  float* __restrict divisor = s.divisor;
  if (plan.method == TIES) {
    float* const sum_out[1] = {s.sum};
    sum_inputs<1>(plan, start, count, sum_out, s, [&](int64_t i, int k0, int k1, float* const* destinations) {
      const float* __restrict product = product_of(i);
      float* __restrict destination = destinations[0];
      for (int k = k0; k < k1; ++k) destination[k] += product[k];
    });
    for (int k = 0; k < count; ++k) s.majority[k] = round_to<D>(s.sum[k]) >= 0.0f ? 1.0f : -1.0f;
    float* const masked_out[2] = {s.mixed, s.divisor};
    sum_inputs<2>(plan, start, count, masked_out, s, [&](int64_t i, int k0, int k1, float* const* destinations) {
      const float* __restrict product = product_of(i);
      const float* __restrict majority = s.majority;
      float* __restrict mixed_sum = destinations[0];
      float* __restrict weight_sum = destinations[1];
      const float weight = plan.input_weight[i];
      const float masked_weight = weight * 0.0f;
      for (int k = k0; k < k1; ++k) {
        const float p = product[k];
        const float masked = p * 0.0f;  // ±0, or NaN for ±inf and NaN, as torch's deltas * mask
        const bool keep = kept(majority[k], p);
        mixed_sum[k] += keep ? p : masked;
        weight_sum[k] += keep ? weight : masked_weight;
      }
    });
    for (int k = 0; k < count; ++k) {
      const float rounded = round_to<D>(divisor[k]);
      divisor[k] = rounded == 0.0f ? 1.0f : rounded;
    }
  } else {
    float* const sum_out[1] = {s.mixed};
    sum_inputs<1>(plan, start, count, sum_out, s, [&](int64_t i, int k0, int k1, float* const* destinations) {
      const float* __restrict product = product_of(i);
      float* __restrict destination = destinations[0];
      for (int k = k0; k < k1; ++k) destination[k] += product[k];
    });
  }
  // One simple loop per step, so that each is vectorized.
  for (int k = 0; k < count; ++k) mixed[k] = round_to<D>(mixed[k]);
  if (plan.normalize && plan.method == TIES) {
    for (int k = 0; k < count; ++k) mixed[k] = round_to<D>(mixed[k] / divisor[k]);
  } else if (plan.normalize) {
    const float scalar_divisor = plan.divisor;
    for (int k = 0; k < count; ++k) mixed[k] = round_to<D>(mixed[k] / scalar_divisor);
  }
  if (plan.apply_lambda) {
    const float lambda = plan.lambda;
    for (int k = 0; k < count; ++k) mixed[k] = round_to<D>(mixed[k] * lambda);
  }
  const float* __restrict base = s.base;
  for (int k = 0; k < count; ++k) mixed[k] = round_to<D>(base[k] + mixed[k]);
  if (plan.out_dtype != D) round_array(plan.out_dtype, count, mixed);
  store_floats(mixed, plan.out_dtype, start, count, plan.out);
}

// An input as mergekit's linear merge receives it (rounded to the merge dtype), for every element of the chunk.
template <int D>
void source_values(const Source& source, int64_t start, int count, float* out) {
  load_floats(source.values, source.dtype, start, count, out);
  if (source.product != nullptr) {
    const float* __restrict lora = source.product + start;
    const float scale = source.scale;
    for (int k = 0; k < count; ++k) {
      const float update = lora[k] * scale;
      out[k] = out[k] + update;
    }
    round_array(source.via_dtype, count, out);
    if (source.via_dtype != D) round_array(D, count, out);
  }
}

template <int D>
void linear_chunk(const Plan& plan, int64_t start, int count, Scratch& s) {
  for (size_t j = 0; j < plan.sources.size(); ++j) source_values<D>(plan.sources[j], start, count, s.deltas + j * CHUNK);
  float* __restrict result = s.mixed;
  for (int k = 0; k < count; ++k) result[k] = 0.0f;
  for (size_t i = 0; i < plan.input_source.size(); ++i) {
    const float* __restrict values = s.deltas + static_cast<size_t>(plan.input_source[i]) * CHUNK;
    const float coefficient = plan.input_weight[i];
    if (plan.fused_multiply_add) {
      for (int k = 0; k < count; ++k) result[k] = std::fma(values[k], coefficient, result[k]);
    } else {
      for (int k = 0; k < count; ++k) {
        const float term = values[k] * coefficient;
        result[k] = result[k] + term;
      }
    }
  }
  if (plan.normalize) {
    const float divisor = plan.divisor;
    for (int k = 0; k < count; ++k) result[k] = result[k] / divisor;
  }
  round_array(D, count, result);
  if (plan.out_dtype != D) round_array(plan.out_dtype, count, result);
  store_floats(result, plan.out_dtype, start, count, plan.out);
}

template <int D>
void run_plan(const Plan& plan) {
  Scratch scratch(static_cast<int>(plan.sources.size()), static_cast<int>(plan.product_source.size()));
  for (int64_t start = 0; start < plan.numel; start += CHUNK) {
    const int count = static_cast<int>(std::min<int64_t>(CHUNK, plan.numel - start));
    if (plan.method == LINEAR) {
      linear_chunk<D>(plan, start, count, scratch);
    } else {
      task_arithmetic_chunk<D>(plan, start, count, scratch);
    }
  }
}

void run(const Plan& plan) {
  switch (plan.dtype) {
    case BF16:
      run_plan<BF16>(plan);
      break;
    case F16:
      run_plan<F16>(plan);
      break;
    default:
      run_plan<F32>(plan);
  }
}

bool valid_dtype(int dtype) { return dtype == F32 || dtype == BF16 || dtype == F16; }

void* pointer_of(PyObject* value) { return PyLong_AsVoidPtr(value); }

// merge(method, dtype, out_dtype, numel, cascade_columns, out, base, base_dtype, sources, inputs, normalize,
//       apply_lambda, lambda, divisor, fused_multiply_add)
// sources: [(values, dtype, product or 0, scale, via_dtype)], inputs: [(source index, weight)]; pointers as ints.
// The caller (kernel.py) checks shapes, dtypes and contiguity; the GIL is released while the block is merged.
PyObject* merge(PyObject*, PyObject* args) {
  Plan plan{};
  PyObject *out, *base, *sources, *inputs;
  int normalize, apply_lambda, fused_multiply_add;
  if (!PyArg_ParseTuple(args, "iiiLLOOiOOppffp", &plan.method, &plan.dtype, &plan.out_dtype, &plan.numel,
                        &plan.cascade_columns, &out, &base, &plan.base_dtype, &sources, &inputs, &normalize,
                        &apply_lambda, &plan.lambda, &plan.divisor, &fused_multiply_add))
    return nullptr;
  plan.normalize = normalize;
  plan.apply_lambda = apply_lambda;
  plan.fused_multiply_add = fused_multiply_add;
  plan.out = pointer_of(out);
  plan.base = pointer_of(base);
  if (PyErr_Occurred()) return nullptr;
  if (!valid_dtype(plan.dtype) || !valid_dtype(plan.out_dtype) ||
      (plan.method != LINEAR && !valid_dtype(plan.base_dtype)) || plan.method < TIES || plan.method > LINEAR ||
      plan.numel < 0) {
    PyErr_SetString(PyExc_ValueError, "merge kernel: bad method, dtype or size");
    return nullptr;
  }
  if (!PyList_Check(sources) || !PyList_Check(inputs)) {
    PyErr_SetString(PyExc_TypeError, "merge kernel: sources and inputs must be lists");
    return nullptr;
  }
  for (Py_ssize_t j = 0; j < PyList_GET_SIZE(sources); ++j) {
    PyObject *values, *product;
    Source source{};
    if (!PyArg_ParseTuple(PyList_GET_ITEM(sources, j), "OiOfi", &values, &source.dtype, &product, &source.scale,
                          &source.via_dtype))
      return nullptr;
    source.values = pointer_of(values);
    source.product = static_cast<const float*>(pointer_of(product));
    if (PyErr_Occurred()) return nullptr;
    if (!valid_dtype(source.dtype) || !valid_dtype(source.via_dtype)) {
      PyErr_SetString(PyExc_ValueError, "merge kernel: bad source dtype");
      return nullptr;
    }
    plan.sources.push_back(source);
  }
  std::map<std::pair<int, uint32_t>, int> distinct;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(inputs); ++i) {
    int source;
    float weight;
    if (!PyArg_ParseTuple(PyList_GET_ITEM(inputs, i), "if", &source, &weight)) return nullptr;
    if (source < 0 || source >= static_cast<int>(plan.sources.size())) {
      PyErr_SetString(PyExc_IndexError, "merge kernel: input names no source");
      return nullptr;
    }
    plan.input_source.push_back(source);
    plan.input_weight.push_back(weight);
    const auto key = std::make_pair(source, bits_of(weight));
    auto found = distinct.find(key);
    if (found == distinct.end()) {
      found = distinct.emplace(key, static_cast<int>(plan.product_source.size())).first;
      plan.product_source.push_back(source);
      plan.product_weight.push_back(weight);
    }
    plan.input_product.push_back(found->second);
  }
  std::vector<int> products_of_source(plan.sources.size(), 0);
  for (int source : plan.product_source) ++products_of_source[source];
  plan.single_product.assign(plan.sources.size(), -1);
  for (size_t q = 0; q < plan.product_source.size(); ++q)
    if (products_of_source[plan.product_source[q]] == 1) plan.single_product[plan.product_source[q]] = static_cast<int>(q);
  if (plan.input_source.empty()) {
    PyErr_SetString(PyExc_ValueError, "merge kernel: no inputs");
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  run(plan);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// convert(source, source_dtype, out, out_dtype, count): values rounded as the kernel rounds them (tests compare
// this with torch's own casts).
PyObject* convert(PyObject*, PyObject* args) {
  PyObject *source, *out;
  int source_dtype, out_dtype;
  long long count;
  if (!PyArg_ParseTuple(args, "OiOiL", &source, &source_dtype, &out, &out_dtype, &count)) return nullptr;
  const void* in = pointer_of(source);
  void* destination = pointer_of(out);
  if (PyErr_Occurred()) return nullptr;
  if (!valid_dtype(source_dtype) || !valid_dtype(out_dtype) || count < 0) {
    PyErr_SetString(PyExc_ValueError, "convert: bad dtype or count");
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  float values[CHUNK];
  for (long long start = 0; start < count; start += CHUNK) {
    const int chunk = static_cast<int>(std::min<long long>(CHUNK, count - start));
    load_floats(in, source_dtype, start, chunk, values);
    round_array(out_dtype, chunk, values);
    store_floats(values, out_dtype, start, chunk, destination);
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"merge", merge, METH_VARARGS, "Merge one block of rows (see merge_kernel.cpp)."},
    {"convert", convert, METH_VARARGS, "Round values to a dtype as the kernel does."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, FTMERGE_NAME(TORCH_EXTENSION_NAME), nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC FTMERGE_INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
