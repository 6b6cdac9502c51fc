// Write side of the quantized KV cache (Tandem): one row of D values -> codes + fp16 scales, the same arithmetic
// as tandem/kernels/quant_attention.quantize (fp32 ops in the same order, round half to even, fp16 scales) so the
// codes match the torch path; only the squared-error sum that picks a turbo step may round differently (near-ties).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kv_format.h"

namespace {

constexpr float FP16_TINY = 5.9604644775390625e-8f, FP16_MAX = 65504.0f;
// candidate steps (fractions of absmax / half), as quant_attention._STEP_GRID
constexpr float GRID[6] = {1.0f, 0.85f, 0.72f, 0.6f, 0.5f, 0.42f};

static inline float clampf(float v, float lo, float hi) { return std::min(std::max(v, lo), hi); }
static inline uint16_t to_f16(float v) { return _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline float f16_round(float v) { return _cvtsh_ss(to_f16(v)); }

// one block of n values -> codes c (int8 for 8 bits, else unsigned mid-rise), returns the fp16 scale
static uint16_t quant_block(const float* y, int64_t n, int bits, uint8_t* c) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(y[i]));
  if (bits == 8) {
    const float s = f16_round(clampf(amax / 127.0f, FP16_TINY, FP16_MAX));
    for (int64_t i = 0; i < n; ++i) c[i] = (uint8_t)(int8_t)clampf(std::nearbyint(y[i] / s), -127.0f, 127.0f);
    return to_f16(s);
  }
  const float half = (float)((1 << bits) - 1) / 2, top = 2 * half;
  float best_s = 0.0f, best_err = 0.0f;
  for (int gi = 0; gi < (bits == 2 ? 6 : 5); ++gi) {
    const float s = f16_round(clampf(amax * GRID[gi] / half, FP16_TINY, FP16_MAX));
    float err = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float e = (clampf(std::nearbyint(y[i] / s + half), 0.0f, top) - half) * s - y[i];
      err += e * e;
    }
    if (gi == 0 || err < best_err) best_err = err, best_s = s;  // strict: the first of equals wins, as torch.where
  }
  for (int64_t i = 0; i < n; ++i) c[i] = (uint8_t)clampf(std::nearbyint(y[i] / best_s + half), 0.0f, top);
  return to_f16(best_s);
}

// codes c [d] -> packed planes (quant_attention._pack): a b-bit plane splits d into 8/b parts, part i at bit b*i
static void pack(const uint8_t* c, int bits, int64_t d, uint8_t* out) {
  const int planes[2] = {bits == 3 ? 2 : bits, bits == 3 ? 1 : 0};
  int shift = 0;
  for (int pi = 0; pi < 2 && planes[pi]; ++pi) {
    const int b = planes[pi], n = 8 / b, mask = (1 << b) - 1;
    const int64_t nb = d * b / 8;
    for (int64_t o = 0; o < nb; ++o) {
      int byte = 0;
      for (int i = 0; i < n; ++i) byte |= ((c[i * nb + o] >> shift) & mask) << (b * i);
      out[o] = (uint8_t)byte;
    }
    out += nb;
    shift += b;
  }
}

// in-place Walsh-Hadamard transform (Sylvester order) of g doubles
static void fwht(double* t, int64_t g) {
  for (int64_t len = 1; len < g; len <<= 1)
    for (int64_t i = 0; i < g; i += 2 * len)
      for (int64_t j = i; j < i + len; ++j) {
        const double a = t[j], b = t[j + len];
        t[j] = a + b;
        t[j + len] = a - b;
      }
}

}  // namespace

// the rotated basis (declared in kv_format.h); torch path: (x.double() @ rotation(d)).float()
void kv_rotate(const float* x, const float* sg, int64_t d, bool back, float* y, double* t) {
  const int64_t g = d & -d;
  const double r = 1.0 / std::sqrt((double)g);
  for (int64_t i = 0; i < d; ++i) t[i] = back ? (double)x[i] : (double)x[i] * sg[i];
  for (int64_t b = 0; b < d; b += g) fwht(t + b, g);
  for (int64_t i = 0; i < d; ++i) y[i] = (float)(back ? t[i] * r * sg[i] : t[i] * r);  // back: y @ M^T
}

// one row of D values -> codes (row_bytes) and D/qb fp16 scales; y, t, c: scratch of D
static void quantize_row(const float* x, int64_t D, int bits, const float* sg, uint8_t* codes, uint16_t* scales,
                         float* y, double* t, uint8_t* c) {
  const int64_t qb = D % 32 == 0 ? 32 : D;
  if (sg) kv_rotate(x, sg, D, false, y, t);
  else std::memcpy(y, x, D * sizeof(float));
  uint8_t* dst = bits == 8 ? codes : c;
  for (int64_t b = 0; b < D / qb; ++b) scales[b] = quant_block(y + b * qb, qb, bits, dst + b * qb);
  if (bits != 8) pack(c, bits, D, codes);
}

static void check_args(const torch::Tensor& x, int64_t bits, const torch::Tensor& signs) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous fp32");
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 3 || bits == 2, "bits");
  const int64_t D = x.size(-1);
  TORCH_CHECK(D % 8 == 0 && (D % 32 == 0 || D < 32), "head dim");
  TORCH_CHECK(!signs.numel() || (signs.scalar_type() == torch::kFloat32 && signs.numel() == D), "signs");
}

// x [N, D] fp32 -> (codes [N, D*bits/8] int8 for bits 8 else uint8, scales [N, D/qb] fp16); signs fp32 [D] (rotated
// formats) or empty. qb = 32, or D when D < 32 (quant_attention.qblock).
std::vector<torch::Tensor> kv_quantize(torch::Tensor x, int64_t bits, torch::Tensor signs) {
  check_args(x, bits, signs);
  TORCH_CHECK(x.dim() == 2, "x: [N, D]");
  const int64_t N = x.size(0), D = x.size(1), qb = D % 32 == 0 ? 32 : D, rb = D * bits / 8;
  auto codes = torch::empty({N, rb}, x.options().dtype(bits == 8 ? torch::kInt8 : torch::kUInt8));
  auto scales = torch::empty({N, D / qb}, x.options().dtype(torch::kFloat16));
  const float* xp = x.data_ptr<float>();
  const float* sg = signs.numel() ? signs.data_ptr<float>() : nullptr;
  uint8_t* cp = reinterpret_cast<uint8_t*>(codes.data_ptr());
  uint16_t* spp = reinterpret_cast<uint16_t*>(scales.data_ptr());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> y(D);
    std::vector<double> t(D);
    std::vector<uint8_t> c(D);
    for (int64_t n = n0; n < n1; ++n)
      quantize_row(xp + n * D, D, (int)bits, sg, cp + n * rb, spp + n * (D / qb), y.data(), t.data(), c.data());
  });
  return {codes, scales};
}

// Quantize x [B, T, H, D] fp32 straight into a QuantBuffer: codes [S, H, Tmax, rb], scales [S, H, Tmax, D/qb] at
// (slots[b], h, positions[b, t]); position -1 = padding (skipped). Saves the gather/scatter of the torch path.
void kv_store(torch::Tensor x, int64_t bits, torch::Tensor signs, torch::Tensor codes, torch::Tensor scales,
              torch::Tensor slots, torch::Tensor positions) {
  check_args(x, bits, signs);
  TORCH_CHECK(x.dim() == 4 && codes.dim() == 4 && scales.dim() == 4 && codes.is_contiguous() &&
              scales.is_contiguous() && scales.scalar_type() == torch::kFloat16, "shapes");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && positions.scalar_type() == torch::kInt64 &&
              slots.is_contiguous() && positions.is_contiguous(), "int64 slots/positions");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  const int64_t S = codes.size(0), Tmax = codes.size(2), rb = codes.size(3), nb = scales.size(3);
  TORCH_CHECK(codes.size(1) == H && rb == D * bits / 8 && codes.element_size() == 1 && nb == D / (D % 32 ? D : 32) &&
              scales.size(0) == S && scales.size(2) == Tmax && positions.size(0) == B && positions.size(1) == T &&
              slots.size(0) == B, "buffer shapes");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(sp[b] >= 0 && sp[b] < S, "slot out of range");
  for (int64_t i = 0; i < B * T; ++i) TORCH_CHECK(pp[i] < Tmax, "position beyond cache length");
  const float* xp = x.data_ptr<float>();
  const float* sg = signs.numel() ? signs.data_ptr<float>() : nullptr;
  uint8_t* cp = reinterpret_cast<uint8_t*>(codes.data_ptr());
  uint16_t* spp = reinterpret_cast<uint16_t*>(scales.data_ptr());
  at::parallel_for(0, B * T * H, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> y(D);
    std::vector<double> t(D);
    std::vector<uint8_t> c(D);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t h = n % H, bt = n / H, p = pp[bt];
      if (p < 0) continue;
      const int64_t e = (sp[bt / T] * H + h) * Tmax + p;
      quantize_row(xp + n * D, D, (int)bits, sg, cp + e * rb, spp + e * nb, y.data(), t.data(), c.data());
    }
  });
}
