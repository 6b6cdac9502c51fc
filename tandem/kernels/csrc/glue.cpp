// The small per-layer ops between the GEMMs of a decode step (Tandem), one call each instead of 5-30 torch ops:
// RMSNorm (optionally plus a residual, or after one), SiLU-gated products, q/k RMSNorm + RoPE in place, K/V cache
// writes.
//
// Row-invariant by construction: every row (token, or token x head) is computed alone by the same code, a fixed
// fp32 order (16 partial sums, then summed in lane order); nothing depends on the row count or the thread split.
// fp32 only (the callers fall back to torch otherwise).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

// 1 / sqrt(mean(x^2) + eps) of one row, fixed summation order
inline float inv_rms(const float* x, int64_t D, float eps) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= D; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j] * x[i + j];
  for (int j = 0; i < D; ++i, ++j) acc[j] += x[i] * x[i];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  return 1.0f / std::sqrt(s / static_cast<float>(D) + eps);
}

// out[i] = (res[i] +) x[i] * r * (offset + w[i])   (w null: unscaled)
inline void norm_row(const float* x, const float* w, float offset, float eps, const float* res, float* out,
                     int64_t D) {
  const float r = inv_rms(x, D, eps);
  for (int64_t i = 0; i < D; ++i) {
    float v = x[i] * r;
    if (w) v = v * (offset + w[i]);
    out[i] = res ? res[i] + v : v;
  }
}

void check_f32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              what, " must be a contiguous fp32 CPU tensor");
}

const float* weight_ptr(const std::optional<torch::Tensor>& w, int64_t D) {
  if (!w.has_value()) return nullptr;
  check_f32(*w, "norm weight");
  TORCH_CHECK(w->numel() == D, "norm weight has ", w->numel(), " entries, the rows ", D);
  return w->data_ptr<float>();
}

}  // namespace

// x [..., D] -> (residual +) RMSNorm(x) * (offset + w), a new tensor
torch::Tensor rms_norm(torch::Tensor x, std::optional<torch::Tensor> w, double offset, double eps,
                       std::optional<torch::Tensor> residual) {
  check_f32(x, "x");
  const int64_t D = x.size(-1), M = D ? x.numel() / D : 0;
  const float* wp = weight_ptr(w, D);
  const float* rp = nullptr;
  if (residual.has_value()) {
    check_f32(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual shape ", residual->sizes(), " != x shape ", x.sizes());
    rp = residual->data_ptr<float>();
  }
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, 64, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      norm_row(xp + m * D, wp, (float)offset, (float)eps, rp ? rp + m * D : nullptr, op + m * D, D);
  });
  return out;
}

// h = x + y (the residual add: fp32 adds, torch's bits), n = RMSNorm(h) * (offset + w): [h, n] in one call
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor y, std::optional<torch::Tensor> w,
                                        double offset, double eps) {
  check_f32(x, "x");
  check_f32(y, "y");
  TORCH_CHECK(x.sizes() == y.sizes(), "add_rms_norm: x shape ", x.sizes(), " != y shape ", y.sizes());
  const int64_t D = x.size(-1), M = D ? x.numel() / D : 0;
  const float* wp = weight_ptr(w, D);
  auto h = torch::empty_like(x), n = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *yp = y.data_ptr<float>();
  float *hp = h.data_ptr<float>(), *np = n.data_ptr<float>();
  at::parallel_for(0, M, 64, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      for (int64_t i = 0; i < D; ++i) hp[m * D + i] = xp[m * D + i] + yp[m * D + i];
      norm_row(hp + m * D, wp, (float)offset, (float)eps, nullptr, np + m * D, D);
    }
  });
  return {h, n};
}

// silu(gate) * up [M, I], row by row: every row goes through the same at::silu call of I elements whatever M is
// (torch's vector loop splits a flat tensor by its size), so a row's bits do not depend on its neighbours
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  check_f32(gate, "gate");
  check_f32(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "silu_mul: gate shape ", gate.sizes(), " != up shape ", up.sizes());
  const int64_t I = gate.size(-1), M = I ? gate.numel() / I : 0;
  auto out = torch::empty_like(gate);
  auto g2 = gate.view({M, I}), u2 = up.view({M, I}), o2 = out.view({M, I});
  for (int64_t m = 0; m < M; ++m) {
    auto o = o2[m];
    at::silu_out(o, g2[m]);
    o.mul_(u2[m]);
  }
  return out;
}

// x [N, H, D] in place: optional per-head RMSNorm (w, offset), then RoPE (rotate_half) with cos/sin [N, D]
void norm_rope_(torch::Tensor x, std::optional<torch::Tensor> w, double offset, double eps, bool norm,
                torch::Tensor cos, torch::Tensor sin) {
  check_f32(x, "x");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
              cos.size(1) == x.size(2) && x.size(2) % 2 == 0, "norm_rope_: x [N, H, D], cos/sin [N, D] expected");
  const int64_t N = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  const float* wp = norm ? weight_ptr(w, D) : nullptr;
  float* xp = x.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  at::parallel_for(0, N * H, 64, [&](int64_t b, int64_t e) {
    std::vector<float> t(D);
    for (int64_t r = b; r < e; ++r) {
      float* row = xp + r * D;
      const float *c = cp + (r / H) * D, *s = sp + (r / H) * D;
      if (norm) norm_row(row, wp, (float)offset, (float)eps, nullptr, t.data(), D);
      else std::memcpy(t.data(), row, D * sizeof(float));
      for (int64_t i = 0; i < half; ++i) row[i] = t[i] * c[i] - t[i + half] * s[i];
      for (int64_t i = half; i < D; ++i) row[i] = t[i] * c[i] + t[i - half] * s[i];
    }
  });
}

// buf [S, H, Tmax, D] <- x [B, T, H, D] (same dtype) at (slots [B], positions [B, T]); position -1 = padding
void kv_write(torch::Tensor buf, torch::Tensor x, torch::Tensor slots, torch::Tensor positions) {
  TORCH_CHECK(buf.device().is_cpu() && x.device().is_cpu() && buf.is_contiguous() && x.is_contiguous() &&
              buf.scalar_type() == x.scalar_type(), "kv_write: contiguous CPU tensors of one dtype expected");
  TORCH_CHECK(buf.dim() == 4 && x.dim() == 4 && x.size(2) == buf.size(1) && x.size(3) == buf.size(3),
              "kv_write: buf [S, H, Tmax, D], x [B, T, H, D] expected");
  auto sl = slots.to(torch::kInt64).contiguous();
  auto pos = positions.to(torch::kInt64).contiguous();
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  const int64_t S = buf.size(0), Tmax = buf.size(2), es = x.element_size();
  TORCH_CHECK(sl.numel() == B && pos.size(0) == B && pos.size(1) == T, "kv_write: slots [B], positions [B, T]");
  const int64_t *s = sl.data_ptr<int64_t>(), *p = pos.data_ptr<int64_t>();
  auto* dst = static_cast<char*>(buf.data_ptr());
  const auto* src = static_cast<const char*>(x.data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= s[b] && s[b] < S, "kv_write: slot ", s[b], " outside [0, ", S, ")");
    for (int64_t t = 0; t < T; ++t) {
      const int64_t q = p[b * T + t];
      if (q < 0) continue;
      TORCH_CHECK(q < Tmax, "kv_write: position ", q, " outside the cache [0, ", Tmax, ")");
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(dst + ((s[b] * H + h) * Tmax + q) * D * es, src + ((b * T + t) * H + h) * D * es, D * es);
    }
  }
}

// Row argmax of x [N, V] fp32 -> int64 [N], as torch.argmax: the first index of the maximum. Each row is split
// into 2 chunks over the threads (max, then its first index); -1 for a row holding a NaN (the caller falls back).
torch::Tensor argmax_rows(torch::Tensor x) {
  check_f32(x, "argmax_rows: x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "argmax_rows: x [N, V] expected");
  const int64_t N = x.size(0), V = x.size(1), C = 2, len = (V + C - 1) / C;
  std::vector<float> cmax(N * C);
  std::vector<int64_t> cidx(N * C);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const float* r = xp + (it / C) * V;
      const int64_t lo = (it % C) * len, hi = std::min(V, lo + len);
      if (lo >= hi) { cmax[it] = -INFINITY; cidx[it] = V; continue; }
      __m512 m = _mm512_set1_ps(-INFINITY);
      __mmask16 nan = 0;
      int64_t i = lo;
      for (; i + 16 <= hi; i += 16) {
        const __m512 v = _mm512_loadu_ps(r + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        m = _mm512_max_ps(m, v);
      }
      float best = _mm512_reduce_max_ps(m);
      for (int64_t j = i; j < hi; ++j) {
        if (r[j] != r[j]) nan = 1;
        best = std::max(best, r[j]);
      }
      int64_t at = lo;
      while (at < hi && r[at] != best) ++at;
      cmax[it] = best, cidx[it] = nan ? -1 : at;
    }
  });
  auto out = torch::empty({N}, torch::kInt64);
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    int64_t c0 = n * C;
    bool nan = false;
    for (int64_t c = n * C; c < n * C + C; ++c) {
      nan |= cidx[c] < 0;
      if (cmax[c] > cmax[c0]) c0 = c;  // strictly greater: an earlier chunk keeps a tie
    }
    op[n] = nan ? -1 : cidx[c0];
  }
  return out;
}
