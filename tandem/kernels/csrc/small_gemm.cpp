// Batch-invariant small-M GEMM y[M,N] = x[M,K] @ W[N,K]^T for decode/verify (Tandem).
//
// Invariance by construction: every output element y[m,n] is ONE fp32 FMA chain over k = 0..K-1 starting from 0
// (acc = fma(x[m,k], w[n,k], acc)). Vectorisation runs across n (16 columns per zmm) and x[m,k] is broadcast, so
// the register tile (how many rows share a weight load) changes only which rows run side by side, never the
// arithmetic of any element. FMA rounds once, so the result of a row is bitwise the same for any M, any tile
// shape, any thread split (threads split whole 64-column panels / row blocks, never K).
//
// Weight layouts (N padded to a multiple of 64 with zero rows):
//   bf16 : uint16 [N/64][K][64]                   (panel-major, each k-step of a panel is 128 contiguous bytes)
//   f16  : the same with fp16 bits (a GGUF F16 tensor's values, exact in fp32)
//   q8_0 : int8   [N/64][K][64] + fp16 d [N/64][K/32][64]   (GGUF Q8_0 values: w = d * q, exact in fp32)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

namespace {

constexpr int NB = 64;       // columns per panel = 4 zmm
constexpr int MR_MAX = 6;    // rows per register tile (6 x 4 accumulators)
constexpr int MBLK = 48;     // rows per parallel work item (multiple of MR_MAX)

static inline __m512 bf16x16_to_f32(const uint16_t* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

static inline __m512 i8x16_to_f32(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <int MR>
static inline void store_tile(__m512 (&acc)[MR][4], float* y, int64_t ldy, int ncols) {
  if (ncols == NB) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + i * ldy + 16 * j, acc[i][j]);
  } else {
    for (int j = 0; j < 4; ++j) {
      int c = ncols - 16 * j;
      if (c <= 0) break;
      __mmask16 m = c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << c) - 1);
      for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(y + i * ldy + 16 * j, m, acc[i][j]);
    }
  }
}

template <bool F16>
static inline __m512 half16(const uint16_t* p) {
  return F16 ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))) : bf16x16_to_f32(p);
}

template <bool F16, int MR>
static void tile_half(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float* y, int64_t ldy, int ncols) {
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const uint16_t* wk = w + k * NB;
    _mm_prefetch(reinterpret_cast<const char*>(wk + 16 * NB), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wk + 16 * NB + 32), _MM_HINT_T0);
    __m512 w0 = half16<F16>(wk), w1 = half16<F16>(wk + 16);
    __m512 w2 = half16<F16>(wk + 32), w3 = half16<F16>(wk + 48);
    for (int i = 0; i < MR; ++i) {
      __m512 xb = _mm512_set1_ps(x[i * ldx + k]);
      acc[i][0] = _mm512_fmadd_ps(xb, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xb, w1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(xb, w2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(xb, w3, acc[i][3]);
    }
  }
  store_tile<MR>(acc, y, ldy, ncols);
}
template <int MR> static void tile_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float* y,
                                        int64_t ldy, int ncols) { tile_half<false, MR>(x, ldx, w, K, y, ldy, ncols); }
template <int MR> static void tile_f16(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float* y,
                                       int64_t ldy, int ncols) { tile_half<true, MR>(x, ldx, w, K, y, ldy, ncols); }

template <int MR>
static void tile_q8_0(const float* x, int64_t ldx, const int8_t* q, const uint16_t* d, int64_t K, float* y,
                      int64_t ldy, int ncols) {
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < K / 32; ++kb) {
    const uint16_t* db = d + kb * NB;
    const __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(db)));
    const __m512 d1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(db + 16)));
    const __m512 d2 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(db + 32)));
    const __m512 d3 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(db + 48)));
    for (int64_t k = kb * 32; k < kb * 32 + 32; ++k) {
      const int8_t* qk = q + k * NB;
      _mm_prefetch(reinterpret_cast<const char*>(qk + 24 * NB), _MM_HINT_T0);
      // d * q is exact in fp32 (11-bit x 8-bit mantissas), so this is an fp32 GEMM on the exact Q8_0 values
      __m512 w0 = _mm512_mul_ps(i8x16_to_f32(qk), d0), w1 = _mm512_mul_ps(i8x16_to_f32(qk + 16), d1);
      __m512 w2 = _mm512_mul_ps(i8x16_to_f32(qk + 32), d2), w3 = _mm512_mul_ps(i8x16_to_f32(qk + 48), d3);
      for (int i = 0; i < MR; ++i) {
        __m512 xb = _mm512_set1_ps(x[i * ldx + k]);
        acc[i][0] = _mm512_fmadd_ps(xb, w0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(xb, w1, acc[i][1]);
        acc[i][2] = _mm512_fmadd_ps(xb, w2, acc[i][2]);
        acc[i][3] = _mm512_fmadd_ps(xb, w3, acc[i][3]);
      }
    }
  }
  store_tile<MR>(acc, y, ldy, ncols);
}

// Rows [m0, m1) of one panel, in register tiles of MR_MAX rows and one tail tile (same per-element arithmetic).
template <typename F>
static inline void rows_of_panel(int64_t m0, int64_t m1, F&& tile) {
  int64_t m = m0;
  for (; m + MR_MAX <= m1; m += MR_MAX) tile(m, MR_MAX);
  if (m < m1) tile(m, (int)(m1 - m));
}

#define DISPATCH_MR(mr, FN, ...)              \
  switch (mr) {                               \
    case 1: FN<1>(__VA_ARGS__); break;        \
    case 2: FN<2>(__VA_ARGS__); break;        \
    case 3: FN<3>(__VA_ARGS__); break;        \
    case 4: FN<4>(__VA_ARGS__); break;        \
    case 5: FN<5>(__VA_ARGS__); break;        \
    default: FN<6>(__VA_ARGS__); break;       \
  }

}  // namespace

namespace {
template <bool F16>
torch::Tensor gemm_half(torch::Tensor x, torch::Tensor w, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous fp32 [M,K]");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t P = (N + NB - 1) / NB;
  TORCH_CHECK(w.numel() == P * K * NB, "packed bf16 weight has wrong size");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  const int64_t MB = (M + MBLK - 1) / MBLK;
  at::parallel_for(0, P * MB, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t p = it / MB, mb = it % MB;
      const int ncols = (int)std::min<int64_t>(NB, N - p * NB);
      const uint16_t* wpan = wp + p * K * NB;
      rows_of_panel(mb * MBLK, std::min(M, mb * MBLK + MBLK), [&](int64_t m, int mr) {
        if (F16) DISPATCH_MR(mr, tile_f16, xp + m * K, K, wpan, K, yp + m * N + p * NB, N, ncols)
        else DISPATCH_MR(mr, tile_bf16, xp + m * K, K, wpan, K, yp + m * N + p * NB, N, ncols);
      });
    }
  });
  return y;
}
}  // namespace

// x [M, K] fp32 contiguous; w [N/64*K*64] uint16 (bf16 / fp16 bits); returns y [M, N] fp32.
torch::Tensor gemm_bf16(torch::Tensor x, torch::Tensor w, int64_t N) { return gemm_half<false>(x, w, N); }
torch::Tensor gemm_f16(torch::Tensor x, torch::Tensor w, int64_t N) { return gemm_half<true>(x, w, N); }

// x [M, K] fp32; q int8 [N/64*K*64]; d fp16 bits [N/64*(K/32)*64]; returns y [M, N] fp32.
torch::Tensor gemm_q8_0(torch::Tensor x, torch::Tensor q, torch::Tensor d, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous fp32 [M,K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 32 == 0, "q8_0 needs K % 32 == 0");
  const int64_t P = (N + NB - 1) / NB;
  TORCH_CHECK(q.numel() == P * K * NB && d.numel() == P * (K / 32) * NB, "packed q8_0 weight has wrong size");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = reinterpret_cast<const int8_t*>(q.data_ptr());
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr());
  float* yp = y.data_ptr<float>();
  const int64_t MB = (M + MBLK - 1) / MBLK;
  at::parallel_for(0, P * MB, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t p = it / MB, mb = it % MB;
      const int ncols = (int)std::min<int64_t>(NB, N - p * NB);
      const int8_t* qpan = qp + p * K * NB;
      const uint16_t* dpan = dp + p * (K / 32) * NB;
      rows_of_panel(mb * MBLK, std::min(M, mb * MBLK + MBLK), [&](int64_t m, int mr) {
        DISPATCH_MR(mr, tile_q8_0, xp + m * K, K, qpan, dpan, K, yp + m * N + p * NB, N, ncols);
      });
    }
  });
  return y;
}

// Only the panels listed in `panels` [S] (int64): y [M, S*64], columns s*64..s*64+63 = panel panels[s]. The per
// element arithmetic is gemm_*'s, so a selected logit equals the full GEMM's bitwise (sparse LM heads).
torch::Tensor gemm_q8_0_panels(torch::Tensor x, torch::Tensor q, torch::Tensor d, torch::Tensor panels) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous fp32 [M,K]");
  TORCH_CHECK(panels.scalar_type() == torch::kInt64 && panels.is_contiguous(), "panels: contiguous int64");
  const int64_t M = x.size(0), K = x.size(1), S = panels.numel();
  TORCH_CHECK(K % 32 == 0 && q.size(-2) == K && q.size(-1) == NB, "packed q8_0 weight [P, K, 64] expected");
  const int64_t P = q.size(0);
  const int64_t* pp = panels.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(pp[s] >= 0 && pp[s] < P, "panel index out of range");
  auto y = torch::empty({M, S * NB}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = reinterpret_cast<const int8_t*>(q.data_ptr());
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr());
  float* yp = y.data_ptr<float>();
  const int64_t MB = (M + MBLK - 1) / MBLK, N = S * NB;
  at::parallel_for(0, S * MB, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t s = it / MB, mb = it % MB, p = pp[s];
      const int8_t* qpan = qp + p * K * NB;
      const uint16_t* dpan = dp + p * (K / 32) * NB;
      rows_of_panel(mb * MBLK, std::min(M, mb * MBLK + MBLK), [&](int64_t m, int mr) {
        DISPATCH_MR(mr, tile_q8_0, xp + m * K, K, qpan, dpan, K, yp + m * N + s * NB, N, NB);
      });
    }
  });
  return y;
}

torch::Tensor gemm_bf16_panels(torch::Tensor x, torch::Tensor w, torch::Tensor panels) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous fp32 [M,K]");
  TORCH_CHECK(panels.scalar_type() == torch::kInt64 && panels.is_contiguous(), "panels: contiguous int64");
  const int64_t M = x.size(0), K = x.size(1), S = panels.numel();
  TORCH_CHECK(w.size(-2) == K && w.size(-1) == NB, "packed bf16 weight [P, K, 64] expected");
  const int64_t P = w.size(0);
  const int64_t* pp = panels.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(pp[s] >= 0 && pp[s] < P, "panel index out of range");
  auto y = torch::empty({M, S * NB}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  const int64_t MB = (M + MBLK - 1) / MBLK, N = S * NB;
  at::parallel_for(0, S * MB, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t s = it / MB, mb = it % MB;
      const uint16_t* wpan = wp + pp[s] * K * NB;
      rows_of_panel(mb * MBLK, std::min(M, mb * MBLK + MBLK), [&](int64_t m, int mr) {
        DISPATCH_MR(mr, tile_bf16, xp + m * K, K, wpan, K, yp + m * N + s * NB, N, NB);
      });
    }
  });
  return y;
}

// A token id outside the packed table would read past it: refuse it (the engine checks ids first; this is the
// last line, so a bad id never becomes an out-of-bounds read).
void check_rows(const torch::Tensor& rows, int64_t n_rows) {  // also vnni_gemm.cpp's rows_q8_0x8
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && rows.is_contiguous(), "rows: contiguous int64");
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows.numel(); ++r)
    TORCH_CHECK(rp[r] >= 0 && rp[r] < n_rows, "row index ", rp[r], " out of range [0, ", n_rows, ")");
}

// Rows `rows` [R] (int64) of a q8_0 / bf16 panel-packed weight, dequantised to fp32 [R, K] (tied embedding lookup).
torch::Tensor rows_q8_0(torch::Tensor q, torch::Tensor d, torch::Tensor rows, int64_t K) {
  const int64_t R = rows.numel();
  auto out = torch::empty({R, K}, torch::TensorOptions().dtype(torch::kFloat32));
  const int8_t* qp = reinterpret_cast<const int8_t*>(q.data_ptr());
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr());
  const int64_t* rp = rows.data_ptr<int64_t>();
  check_rows(rows, q.size(0) * NB);
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = rp[r], p = n / NB, c = n % NB;
    const int8_t* qpan = qp + p * K * NB;
    const uint16_t* dpan = dp + p * (K / 32) * NB;
    for (int64_t k = 0; k < K; ++k)
      op[r * K + k] = (float)qpan[k * NB + c] * _cvtsh_ss(dpan[(k / 32) * NB + c]);
  }
  return out;
}

torch::Tensor rows_bf16(torch::Tensor w, torch::Tensor rows, int64_t K) {
  const int64_t R = rows.numel();
  auto out = torch::empty({R, K}, torch::TensorOptions().dtype(torch::kFloat32));
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const int64_t* rp = rows.data_ptr<int64_t>();
  check_rows(rows, w.size(0) * NB);
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = rp[r], p = n / NB, c = n % NB;
    const uint16_t* wpan = wp + p * K * NB;
    for (int64_t k = 0; k < K; ++k) {
      uint32_t bits = (uint32_t)wpan[k * NB + c] << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      op[r * K + k] = f;
    }
  }
  return out;
}
