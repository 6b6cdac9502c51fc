// Batch-invariant small-M GEMM y[M,N] = x[M,K] @ W[N,K]^T with int8 x int8 dot products (AVX-512 VNNI), Tandem.
//
// Format q8_0x8: the weight is GGUF Q8_0 (blocks of 32 along K, int8 q + fp16 d); each activation row is quantized
// the same way per 32-block as llama.cpp's quantize_row_q8_0 (d = amax/127, q = round-half-away(x/d), d kept as
// fp16, so dw*dx is exact in fp32). Per row, column and block the int32 dot isum = sum q_w*q_x is exact, and
//   y = one fp32 chain over blocks in order: acc = fma(float(isum), dw*dx, acc)
// so a row's result depends on that row only: bitwise the same for any M, register tile or thread split (threads
// split whole 64-column panels / row blocks, never K).
//
// dpbusd multiplies unsigned by signed bytes: weights are stored as u = q_w + 128 and the row's 128*sum(q_x) of each
// block (computed when the row is quantized) is subtracted from the int32 sum. Layouts (N padded to 64 with q = 0):
//   u8  [N/64][K/4][64][4]   (per panel, 4 consecutive k of one column in one 32-bit lane: 256 bytes per 4 k)
//   d   fp16 [N/64][K/32][64]
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __AVX512VNNI__
namespace {

constexpr int NB = 64;      // columns per panel = 4 zmm of int32 lanes
constexpr int MR_MAX = 3;   // rows per register tile: 3 x (4 int32 + 4 fp32 accumulators) fit in 32 zmm
constexpr int MBLK = 48;    // rows per parallel work item (multiple of MR_MAX)

struct QRows {  // activation rows quantized per 32-block
  torch::Tensor q, d, c;  // int8 [M, K]; fp32 [M, K/32] (fp16 values); int32 [M, K/32] = 128 * sum(q)
};

// One row: the same arithmetic as tandem.kernels.linear.quantize_act_q8 (fp32 throughout, no contraction).
static void quantize_row(const float* x, int64_t K, int8_t* q, float* d, int32_t* c) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + b * 32;
    __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float db = amax / 127.0f;
    const float id = db > 0.0f ? 1.0f / db : 0.0f;
    int32_t sum = 0;
    for (int h = 0; h < 2; ++h) {
      // round half away from zero (roundf): |v| = t + f exactly, t = floor(|v|), +1 where f >= 0.5
      const __m512 v = _mm512_mul_ps(h ? v1 : v0, _mm512_set1_ps(id)), a = _mm512_abs_ps(v);
      __m512 r = _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      r = _mm512_mask_add_ps(r, _mm512_cmp_ps_mask(_mm512_sub_ps(a, r), _mm512_set1_ps(0.5f), _CMP_GE_OQ), r,
                             _mm512_set1_ps(1.0f));
      r = _mm512_min_ps(r, _mm512_set1_ps(127.0f));
      __m512i qi = _mm512_cvttps_epi32(r);
      qi = _mm512_mask_sub_epi32(qi, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ),
                                 _mm512_setzero_si512(), qi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * 32 + 16 * h), _mm512_cvtepi32_epi8(qi));
      sum += _mm512_reduce_add_epi32(qi);
    }
    d[b] = _cvtsh_ss(_cvtss_sh(db, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    c[b] = 128 * sum;
  }
}

static QRows quantize_rows(const torch::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  QRows r{torch::empty({M, K}, torch::kInt8), torch::empty({M, K / 32}, torch::kFloat32),
          torch::empty({M, K / 32}, torch::kInt32)};
  const float* xp = x.data_ptr<float>();
  int8_t* qp = r.q.data_ptr<int8_t>();
  float* dp = r.d.data_ptr<float>();
  int32_t* cp = r.c.data_ptr<int32_t>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_row(xp + m * K, K, qp + m * K, dp + m * (K / 32), cp + m * (K / 32));
  });
  return r;
}

template <int MR>
static void tile(const int8_t* xq, const float* dx, const int32_t* cx, int64_t K, const uint8_t* w, const uint16_t* d,
                 float* y, int64_t ldy, int ncols) {
  const int64_t KB = K / 32;
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    __m512i isum[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) isum[i][j] = _mm512_setzero_si512();
    const uint8_t* wb = w + kb * 32 * NB;
    for (int g = 0; g < 8; ++g) {
      const uint8_t* wg = wb + g * 4 * NB;  // no software prefetch: it measured slower than the hardware's here
      for (int j = 0; j < 4; ++j) {
        const __m512i wj = _mm512_loadu_si512(wg + 64 * j);
        for (int i = 0; i < MR; ++i) {
          int32_t x4;
          std::memcpy(&x4, xq + i * K + kb * 32 + g * 4, 4);
          isum[i][j] = _mm512_dpbusd_epi32(isum[i][j], wj, _mm512_set1_epi32(x4));
        }
      }
    }
    const uint16_t* db = d + kb * NB;
    for (int j = 0; j < 4; ++j) {
      const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(db + 16 * j)));
      for (int i = 0; i < MR; ++i) {
        const __m512i s = _mm512_sub_epi32(isum[i][j], _mm512_set1_epi32(cx[i * KB + kb]));
        const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx[i * KB + kb]));  // exact: fp16 x fp16
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[i][j]);
      }
    }
  }
  for (int j = 0; j < 4; ++j) {
    const int c = ncols - 16 * j;
    if (c <= 0) break;
    const __mmask16 m = c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << c) - 1);
    for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(y + i * ldy + 16 * j, m, acc[i][j]);
  }
}

// Rows [m0, m1) against one panel: register tiles of MR_MAX rows and one tail tile (same per-element arithmetic).
static void panel_rows(const QRows& r, int64_t m0, int64_t m1, int64_t K, const uint8_t* w, const uint16_t* d,
                       float* y, int64_t ldy, int ncols) {
  const int8_t* q = r.q.data_ptr<int8_t>();
  const float* dx = r.d.data_ptr<float>();
  const int32_t* cx = r.c.data_ptr<int32_t>();
  const int64_t KB = K / 32;
  for (int64_t m = m0; m < m1; m += MR_MAX) {
    const int mr = (int)std::min<int64_t>(MR_MAX, m1 - m);
    float* ym = y + m * ldy;
    if (mr == 3) tile<3>(q + m * K, dx + m * KB, cx + m * KB, K, w, d, ym, ldy, ncols);
    else if (mr == 2) tile<2>(q + m * K, dx + m * KB, cx + m * KB, K, w, d, ym, ldy, ncols);
    else tile<1>(q + m * K, dx + m * KB, cx + m * KB, K, w, d, ym, ldy, ncols);
  }
}

static void check_args(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& d) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous fp32 [M,K]");
  const int64_t K = x.size(1);
  TORCH_CHECK(K % 32 == 0, "q8_0x8 needs K % 32 == 0, got ", K);
  TORCH_CHECK(w.dim() == 4 && w.size(1) == K / 4 && w.size(2) == NB && w.size(3) == 4 && w.is_contiguous(),
              "packed q8_0x8 weight [P, K/4, 64, 4] expected");
  TORCH_CHECK(d.numel() == w.size(0) * (K / 32) * NB && d.is_contiguous(), "q8_0x8 scales [P, K/32, 64] expected");
}

}  // namespace

// y's column panel s <- weight panel panel_of(s) for every 48-row block; threads split (panel, row block) items,
// never K, so a row's values do not depend on M or the thread count.
template <typename PanelOf>
static void run_panels(const QRows& r, int64_t M, int64_t K, const uint8_t* wp, const uint16_t* dp, float* yp,
                       int64_t ldy, int64_t S, int64_t N, PanelOf panel_of) {
  const int64_t MB = (M + MBLK - 1) / MBLK;
  at::parallel_for(0, S * MB, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t s = it / MB, mb = it % MB, p = panel_of(s);
      const int ncols = (int)std::min<int64_t>(NB, N - p * NB);
      panel_rows(r, mb * MBLK, std::min(M, mb * MBLK + MBLK), K, wp + p * K * NB, dp + p * (K / 32) * NB,
                 yp + s * NB, ldy, ncols);
    }
  });
}

// x [M, K] fp32; w uint8 [P, K/4, 64, 4]; d fp16 [P, K/32, 64]; returns y [M, N] fp32.
torch::Tensor gemm_q8_0x8(torch::Tensor x, torch::Tensor w, torch::Tensor d, int64_t N) {
  check_args(x, w, d);
  const int64_t M = x.size(0), K = x.size(1), P = (N + NB - 1) / NB;
  TORCH_CHECK(w.size(0) == P, "packed q8_0x8 weight has ", w.size(0), " panels, N=", N, " needs ", P);
  const QRows r = quantize_rows(x);
  auto y = torch::empty({M, N}, x.options());
  run_panels(r, M, K, w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr()), y.data_ptr<float>(),
             N, P, N, [](int64_t s) { return s; });
  return y;
}

// Only the panels listed in `panels` [S] (int64): y [M, S*64] (sparse LM heads); each value bitwise gemm_q8_0x8's.
torch::Tensor gemm_q8_0x8_panels(torch::Tensor x, torch::Tensor w, torch::Tensor d, torch::Tensor panels) {
  check_args(x, w, d);
  TORCH_CHECK(panels.scalar_type() == torch::kInt64 && panels.is_contiguous(), "panels: contiguous int64");
  const int64_t M = x.size(0), K = x.size(1), S = panels.numel(), P = w.size(0);
  const int64_t* pp = panels.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(pp[s] >= 0 && pp[s] < P, "panel index out of range");
  const QRows r = quantize_rows(x);
  auto y = torch::empty({M, S * NB}, x.options());
  run_panels(r, M, K, w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr()), y.data_ptr<float>(),
             S * NB, S, P * NB, [pp](int64_t s) { return pp[s]; });
  return y;
}

#else  // built for a CPU without VNNI: Python never routes q8_0x8 GEMMs here (tandem.kernels._ext.has_vnni)
torch::Tensor gemm_q8_0x8(torch::Tensor, torch::Tensor, torch::Tensor, int64_t) {
  TORCH_CHECK(false, "q8_0x8 GEMM needs AVX-512 VNNI");
}
torch::Tensor gemm_q8_0x8_panels(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor) {
  TORCH_CHECK(false, "q8_0x8 GEMM needs AVX-512 VNNI");
}
#endif

// Rows `rows` [R] (int64) of a q8_0x8 weight, dequantised to fp32 [R, K] (tied embedding lookup).
torch::Tensor rows_q8_0x8(torch::Tensor w, torch::Tensor d, torch::Tensor rows, int64_t K) {
  constexpr int64_t NB = 64;
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && rows.is_contiguous(), "rows: contiguous int64");
  TORCH_CHECK(w.numel() == w.size(0) * K * NB && d.numel() == w.size(0) * (K / 32) * NB, "q8_0x8 weight size");
  const int64_t R = rows.numel(), n_rows = w.size(0) * NB;
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(rp[r] >= 0 && rp[r] < n_rows, "row index ", rp[r], " out of range [0, ", n_rows, ")");
  auto out = torch::empty({R, K}, torch::TensorOptions().dtype(torch::kFloat32));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr());
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = rp[r], p = n / NB, c = n % NB;
    const uint8_t* wpan = wp + p * K * NB;
    const uint16_t* dpan = dp + p * (K / 32) * NB;
    for (int64_t k = 0; k < K; ++k)
      op[r * K + k] = (float)(wpan[(k / 4) * 4 * NB + c * 4 + k % 4] - 128) * _cvtsh_ss(dpan[(k / 32) * NB + c]);
  }
  return out;
}
