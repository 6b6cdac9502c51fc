// Batch-invariant small-M GEMM y[M,N] = x[M,K] @ W[N,K]^T with int8 x int8 dot products (AVX-512 VNNI), Tandem.
//
// Each activation row is quantized per 32-block as llama.cpp's quantize_row_q8_0 (d = amax/127, q = round-half-away
// (x/d), d kept as fp16). The weight keeps a GGUF type's own integers (no requantisation), stored unsigned as u
// (csrc/vnni_formats.h): w = a * (u - off) - b per scale group of SG k (b only for the types with a min):
//   q8_0x8 u = q + 128, q5_0x8 u = q + 16, q4_0x8 u = q + 8, q4_1x8 / q5_1x8 u = q (a = d, b = -m),
//   q4_kx8 / q5_kx8 u = q (a = d*sc, b = dmin*m per 32), q6_kx8 u = q + 32 (a = d*sc per 16),
//   q3_kx8 u = q + 4 (a = d*(sc-32) per 16), q2_kx8 u = q (a = d*(sc&15), b = dmin*(sc>>4) per 16),
//   iq4_nlx8 / iq4_xsx8 u = kvalues_iq4nl[i] + 128 (a = d, or d*(sc-32) per 32).
// Per row, column and scale group the int32 dot isum = sum u*q_x is exact (dpbusd: unsigned x signed bytes), the
// offset comes off exactly (off * sum q_x, summed when the row is quantized), and y is one fp32 chain over the
// groups in order, acc = fma(float(isum - off*sx), a*dx, acc) (with a min: then acc = fma(-float(sx), b*dx, acc)),
// so a row's result depends on that row only: bitwise the same for any M, register tile or thread split (threads
// split whole 64-column panels / row blocks, never K). N is padded to 64 with zero scales.
// Layouts, per 64-column panel (kb: 32-block, g: 4 consecutive k, j: 16 columns; 64 values per (kb, g, j) ordered
// column-major (column c, k) -> byte 4c + k, one dpbusd lane per column). Bit planes of u (tandem.kernels.kquants
// STREAMS), groups in pairs (gp: g = 2gp, 2gp+1 -> A, B):
//   u8     [KB][8][4][64]       the bytes
//   nib    [KB][4][4][64]       byte i = A[i] & 15 | (B[i] & 15) << 4: one 64-byte load and 3 ops give two groups
//   crumbs [KB][4][4][32]       byte i = 2-bit fields of A[i], A[i+32], B[i], B[i+32] at bits 0, 2, 4, 6
//   hbit   u64 [KB][8][4]       bit i: one more bit of v[i]
// then the scale fields, panelized [groups][64] (fp16 or u8/i8; "pairs" [groups][2][64]).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "vnni_formats.h"

#ifdef __AVX512VNNI__
namespace {

using namespace vnni;
constexpr int MR_MAX = 4;   // rows per wide register tile: 4 x 4 int32 accumulators (fp32 ones stay in L1); 5-6
                            // rows spilled: the head's 5-row GEMM cost 2x its 1-row one (measured), 4 rows 0.8-1x
constexpr int MR_NARROW = 8;  // rows per narrow tile (16 columns: 8 int32 + 8 fp32 accumulators in registers)
constexpr int MBLK = 48;    // rows per parallel work item (multiple of MR_MAX and MR_NARROW)

// Row count from which a work item runs narrow tiles (one decoded weight vector feeds up to 8 rows), else wide ones.
// Measured (one thread, k=8 / 1 row, activations as embedded broadcasts): wide -> narrow Q6_K 2.7x -> 2.3-2.4x, Q5_0
// 2.1x -> 1.6-1.8x, Q4_K about the same; not Q8_0, which decodes nothing (its heads: 1.0-1.3x -> 1.4-1.7x).
// TANDEM_VNNI_NARROW_MIN=n overrides it for every format (bench).
template <class F>
static int narrow_min() {
  static const int n = [] { const char* e = std::getenv("TANDEM_VNNI_NARROW_MIN"); return e ? std::atoi(e) : 0; }();
  return n > 0 ? n : std::is_same<F, Q8>::value ? 1 << 30 : 5;
}

struct QRows {  // activation rows quantized per 32-block
  torch::Tensor q, d, s;  // int8 [M, K]; fp32 [M, K/32] (fp16 values); int32 [M, K/16] = sum(q) per 16
};

// One row: the same arithmetic as tandem.kernels.linear.quantize_act_q8 (fp32 throughout, no contraction).
static void quantize_row(const float* x, int64_t K, int8_t* q, float* d, int32_t* s) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + b * 32;
    __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float db = amax / 127.0f;
    const float id = db > 0.0f ? 1.0f / db : 0.0f;
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
      s[2 * b + h] = _mm512_reduce_add_epi32(qi);
    }
    d[b] = _cvtsh_ss(_cvtss_sh(db, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

static QRows quantize_rows(const torch::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  QRows r{torch::empty({M, K}, torch::kInt8), torch::empty({M, K / 32}, torch::kFloat32),
          torch::empty({M, K / 16}, torch::kInt32)};
  const float* xp = x.data_ptr<float>();
  int8_t* qp = r.q.data_ptr<int8_t>();
  float* dp = r.d.data_ptr<float>();
  int32_t* sp = r.s.data_ptr<int32_t>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_row(xp + m * K, K, qp + m * K, dp + m * (K / 32), sp + m * (K / 16));
  });
  return r;
}

struct XRows {  // the tile's rows: row i at q + i*K, d + i*KB, s + i*2*KB
  const int8_t* q; const float* d; const int32_t* s; int64_t K, KB;
};

// acc += u8 w . s8 {x, x, x, x} per lane, x read straight from memory as the instruction's broadcast operand
static inline __m512i dpbusd_bcast(__m512i acc, __m512i w, const int32_t* x) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
  return acc;
}

static inline __m512 load(const float* a, int j) { return _mm512_load_ps(a + 16 * j); }
static inline void store(float* a, int j, __m512 v) { _mm512_store_ps(a + 16 * j, v); }

static inline int32_t group_sum(const XRows& x, int i, int64_t kb, int h, int sg) {  // sum q_x of scale group h
  const int32_t* s = x.s + i * 2 * x.KB + 2 * kb;
  return sg == 32 ? s[0] + s[1] : s[h];
}

// One scale group into one fp32 chain (v = isum - off*sx, exact): the arithmetic every tile shares.
template <class F>
static inline __m512 step(__m512i v, __m512 a, __m512 b, int32_t sx, float dxs, __m512 acc) {
  const __m512 dx = _mm512_set1_ps(dxs);
  __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(a, dx), acc);
  return F::HAS_B ? _mm512_fmadd_ps(_mm512_set1_ps(-(float)sx), _mm512_mul_ps(b, dx), t) : t;
}

// Scale group h of block kb into the fp32 chains: acc = fma(float(isum - off*sx), a*dx, acc) [- sx * b*dx].
template <class F, int MR>
static inline void fold(const F& f, int64_t kb, int h, __m512i (&is)[MR][4], float (&acc)[MR][64], const XRows& x) {
  for (int j = 0; j < 4; ++j) {
    __m512 a, b;
    f.scales(kb, h, j, a, b);
    for (int i = 0; i < MR; ++i) {
      const int32_t sx = group_sum(x, i, kb, h, F::SG);
      const __m512i v = F::OFF ? _mm512_sub_epi32(is[i][j], _mm512_set1_epi32(F::OFF * sx)) : is[i][j];
      store(acc[i], j, step<F>(v, a, b, sx, x.d[i * x.KB + kb], load(acc[i], j)));
    }
  }
}

// Up to 8 rows x 16 columns (chunk j) at a time, every accumulator in registers: for 5..8 rows the weights are
// decoded once per 8 rows, not once per 4. Per element the same integers and step() chain as tile().
template <class F, int MR>
static void tile_narrow(const XRows& x, const F& f, float* y, int64_t ldy, int ncols) {
  constexpr int H = 32 / F::SG, GH = 8 / H;
  for (int j = 0; j < 4 && 16 * j < ncols; ++j) {
    __m512 acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < x.KB; ++kb) {
      for (int h = 0; h < H; ++h) {
        __m512i isum[MR];  // starts at -off*sx: isum - off*sx exactly, as tile()'s
        for (int i = 0; i < MR; ++i) isum[i] = _mm512_set1_epi32(-F::OFF * group_sum(x, i, kb, h, F::SG));
        for (int gp = h * GH / 2; gp < (h + 1) * GH / 2; ++gp) {
          __m512i wa, wb;
          f.w(kb, gp, j, wa, wb);
          for (int i = 0; i < MR; ++i) {  // the activations' 4 bytes as an embedded broadcast operand ({1to16})
            const int32_t* xp = reinterpret_cast<const int32_t*>(x.q + i * x.K + kb * 32 + gp * 8);
            isum[i] = dpbusd_bcast(isum[i], wa, xp);
            isum[i] = dpbusd_bcast(isum[i], wb, xp + 1);
          }
        }
        __m512 a, b;
        f.scales(kb, h, j, a, b);
        for (int i = 0; i < MR; ++i)
          acc[i] = step<F>(isum[i], a, b, group_sum(x, i, kb, h, F::SG), x.d[i * x.KB + kb], acc[i]);
      }
    }
    const int c = ncols - 16 * j;
    const __mmask16 m = c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << c) - 1);
    for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(y + i * ldy + 16 * j, m, acc[i]);
  }
}

template <class F, int MR>
static void tile(const XRows& x, const F& f, float* y, int64_t ldy, int ncols) {
  constexpr int H = 32 / F::SG, GH = 8 / H;  // scale groups per block, 4-k groups per scale group
  alignas(64) float acc[MR][64] = {};  // in L1, not registers: the int32 sums and the decoded weights take them
  for (int64_t kb = 0; kb < x.KB; ++kb) {
    for (int h = 0; h < H; ++h) {
      __m512i isum[MR][4];
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < 4; ++j) isum[i][j] = _mm512_setzero_si512();
      for (int gp = h * GH / 2; gp < (h + 1) * GH / 2; ++gp) {  // no software prefetch: it measured slower
        for (int j = 0; j < 4; ++j) {
          __m512i wa, wb;
          f.w(kb, gp, j, wa, wb);
          for (int i = 0; i < MR; ++i) {
            const int32_t* xp = reinterpret_cast<const int32_t*>(x.q + i * x.K + kb * 32 + gp * 8);
            isum[i][j] = dpbusd_bcast(isum[i][j], wa, xp);
            isum[i][j] = dpbusd_bcast(isum[i][j], wb, xp + 1);
          }
        }
      }
      fold<F, MR>(f, kb, h, isum, acc, x);
    }
  }
  for (int j = 0; j < 4; ++j) {
    const int c = ncols - 16 * j;
    if (c <= 0) break;
    const __mmask16 m = c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << c) - 1);
    for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(y + i * ldy + 16 * j, m, load(acc[i], j));
  }
}

// One GEMM of a multi-GEMM call: the same activation rows against one weight, into its own y.
struct Seg {
  int fmt;                              // index into FORMATS
  std::vector<const uint8_t*> st;       // the format's streams
  std::vector<int64_t> bytes;           // each stream's bytes per panel
  float* y; int64_t ldy, S, N;          // y's column panel s <- weight panel panel_of(s), s < S; N weight rows
  const int64_t* panels;                // panel_of(s) = panels[s], or s when null
};

// Rows [m0, m1) against one panel: narrow 8-row tiles from narrow_min<F>() rows on, else wide MR_MAX-row tiles (the
// same per-element arithmetic either way).
template <class F>
static void panel_rows(const QRows& r, int64_t m0, int64_t m1, int64_t K, const Seg& g, int64_t s) {
  const int64_t KB = K / 32, p = g.panels ? g.panels[s] : s;
  const int ncols = (int)std::min<int64_t>(NB, g.N - p * NB);
  const uint8_t* ptr[8];
  for (size_t i = 0; i < g.st.size(); ++i) ptr[i] = g.st[i] + p * g.bytes[i];
  const F f{ptr};
  const int8_t* q = r.q.data_ptr<int8_t>();
  const float* dx = r.d.data_ptr<float>();
  const int32_t* sx = r.s.data_ptr<int32_t>();
  for (int64_t m = m0, mr; m < m1; m += mr) {
    const XRows x{q + m * K, dx + m * KB, sx + m * 2 * KB, K, KB};
    float* ym = g.y + m * g.ldy + s * NB;
    if (m1 - m >= narrow_min<F>()) {
      mr = std::min<int64_t>(MR_NARROW, m1 - m);
      switch (mr) {
        case 8: tile_narrow<F, 8>(x, f, ym, g.ldy, ncols); break;
        case 7: tile_narrow<F, 7>(x, f, ym, g.ldy, ncols); break;
        case 6: tile_narrow<F, 6>(x, f, ym, g.ldy, ncols); break;
        case 5: tile_narrow<F, 5>(x, f, ym, g.ldy, ncols); break;
        case 4: tile_narrow<F, 4>(x, f, ym, g.ldy, ncols); break;
        case 3: tile_narrow<F, 3>(x, f, ym, g.ldy, ncols); break;
        case 2: tile_narrow<F, 2>(x, f, ym, g.ldy, ncols); break;
        default: tile_narrow<F, 1>(x, f, ym, g.ldy, ncols);
      }
      continue;
    }
    mr = std::min<int64_t>(MR_MAX, m1 - m);
    switch (mr) {
      case 4: tile<F, 4>(x, f, ym, g.ldy, ncols); break;
      case 3: tile<F, 3>(x, f, ym, g.ldy, ncols); break;
      case 2: tile<F, 2>(x, f, ym, g.ldy, ncols); break;
      default: tile<F, 1>(x, f, ym, g.ldy, ncols);
    }
  }
}

// The formats (tandem.kernels.kquants.STREAMS): name, K multiple, each stream's bytes per panel over K (x 1/256)
struct FormatInfo { const char* name; int kmul; std::vector<int64_t> per256; };
static const FormatInfo FORMATS[] = {
    {"q8_0x8", 32, {256 * NB, 8 * NB * 2}},
    {"q5_0x8", 32, {128 * NB, 32 * NB, 8 * NB * 2}},
    {"q4_kx8", 256, {128 * NB, 8 * NB, 8 * NB, 2 * NB * 2}},
    {"q6_kx8", 256, {128 * NB, 64 * NB, 16 * NB, NB * 2}},
    {"q4_0x8", 32, {128 * NB, 8 * NB * 2}},
    {"q4_1x8", 32, {128 * NB, 8 * 2 * NB * 2}},
    {"q5_1x8", 32, {128 * NB, 32 * NB, 8 * 2 * NB * 2}},
    {"q5_kx8", 256, {128 * NB, 32 * NB, 8 * NB, 8 * NB, 2 * NB * 2}},
    {"iq4_nlx8", 32, {128 * NB, 8 * NB * 2}},
    {"iq4_xsx8", 256, {128 * NB, 8 * NB, NB * 2}},
    {"q3_kx8", 256, {64 * NB, 32 * NB, 16 * NB, NB * 2}},
    {"q2_kx8", 256, {64 * NB, 16 * NB, 2 * NB * 2}},
};

template <class Fn>
static void with_format(int fmt, Fn&& fn) {  // fn(F{}) with the format's struct type
  switch (fmt) {
    case 0: fn(Q8{}); break;
    case 1: fn(QLegacy<16>{}); break;
    case 2: fn(QK45<false>{}); break;
    case 3: fn(Q6K{}); break;
    case 4: fn(QLegacy<8>{}); break;
    case 5: fn(QMin<false>{}); break;
    case 6: fn(QMin<true>{}); break;
    case 7: fn(QK45<true>{}); break;
    case 8: fn(IQ4<false>{}); break;
    case 9: fn(IQ4<true>{}); break;
    case 10: fn(Q3K{}); break;
    default: fn(Q2K{});
  }
}

// Every (segment, panel, 48-row block) item over the threads; threads split whole items, never K, so a row's
// values do not depend on M, the thread count or the other segments.
static void run(const QRows& r, int64_t M, int64_t K, const std::vector<Seg>& segs) {
  const int64_t MB = (M + MBLK - 1) / MBLK;
  std::vector<int64_t> start{0};
  for (const auto& g : segs) start.push_back(start.back() + g.S * MB);
  at::parallel_for(0, start.back(), 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      size_t i = 0;
      while (it >= start[i + 1]) ++i;
      const Seg& g = segs[i];
      const int64_t s = (it - start[i]) / MB, mb = (it - start[i]) % MB;
      const int64_t m0 = mb * MBLK, m1 = std::min(M, m0 + MBLK);
      with_format(g.fmt, [&](auto f) { panel_rows<decltype(f)>(r, m0, m1, K, g, s); });
    }
  });
}

// The format's index and streams (contiguous tensors, sizes checked against P panels of K).
static Seg segment(const std::string& fmt, const std::vector<torch::Tensor>& parts, int64_t P, int64_t K) {
  int id = 0;
  while (id < (int)(sizeof(FORMATS) / sizeof(FORMATS[0])) && fmt != FORMATS[id].name) ++id;
  TORCH_CHECK(id < (int)(sizeof(FORMATS) / sizeof(FORMATS[0])), "unknown VNNI weight format ", fmt);
  const FormatInfo& fi = FORMATS[id];
  TORCH_CHECK(K % fi.kmul == 0, fmt, " needs K % ", fi.kmul, " == 0, got ", K);
  TORCH_CHECK(parts.size() == fi.per256.size(), fmt, " takes ", fi.per256.size(), " tensors, got ", parts.size());
  Seg g{id, {}, {}, nullptr, 0, P, P * NB, nullptr};
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& t = parts[i];
    const int64_t bytes = fi.per256[i] * K / 256;
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), fmt, " part ", i, ": contiguous CPU tensor expected");
    TORCH_CHECK(t.numel() * t.element_size() == P * bytes, fmt, " part ", i, ": ", t.numel() * t.element_size(),
                " bytes, expected ", P * bytes, " for ", P, " panels of K=", K);
    g.st.push_back(reinterpret_cast<const uint8_t*>(t.data_ptr()));
    g.bytes.push_back(bytes);
  }
  return g;
}

static void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous fp32 [M,K]");
  TORCH_CHECK(x.size(1) % 32 == 0, "VNNI GEMM needs K % 32 == 0, got ", x.size(1));
}

}  // namespace

// x [M, K] fp32 against several weights at once (one row quantization, one parallel loop): weight i in format
// fmts[i] with streams parts[i] and Ns[i] rows -> y_i [M, Ns[i]], each bitwise gemm_vnni's.
std::vector<torch::Tensor> gemm_vnni_multi(torch::Tensor x, std::vector<std::string> fmts,
                                           std::vector<std::vector<torch::Tensor>> parts, std::vector<int64_t> Ns) {
  check_x(x);
  TORCH_CHECK(fmts.size() == parts.size() && fmts.size() == Ns.size(), "gemm_vnni_multi: one format, parts, N each");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<Seg> segs;
  std::vector<torch::Tensor> ys;
  for (size_t i = 0; i < fmts.size(); ++i) {
    const int64_t P = (Ns[i] + NB - 1) / NB;
    Seg g = segment(fmts[i], parts[i], P, K);
    ys.push_back(torch::empty({M, Ns[i]}, x.options()));
    g.y = ys.back().data_ptr<float>(), g.ldy = Ns[i], g.N = Ns[i];
    segs.push_back(std::move(g));
  }
  run(quantize_rows(x), M, K, segs);
  return ys;
}

// x [M, K] fp32; parts: the format's streams for P = ceil(N/64) panels; returns y [M, N] fp32.
torch::Tensor gemm_vnni(torch::Tensor x, std::string fmt, std::vector<torch::Tensor> parts, int64_t N) {
  return gemm_vnni_multi(x, {fmt}, {parts}, {N})[0];
}

// Only the panels listed in `panels` [S] (int64) of a weight with P panels: y [M, S*64] (sparse LM heads); each
// value bitwise gemm_vnni's.
torch::Tensor gemm_vnni_panels(torch::Tensor x, std::string fmt, std::vector<torch::Tensor> parts, int64_t P,
                               torch::Tensor panels) {
  check_x(x);
  TORCH_CHECK(panels.scalar_type() == torch::kInt64 && panels.is_contiguous(), "panels: contiguous int64");
  const int64_t M = x.size(0), K = x.size(1), S = panels.numel();
  Seg g = segment(fmt, parts, P, K);
  const int64_t* pp = panels.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(pp[s] >= 0 && pp[s] < P, "panel index out of range");
  auto y = torch::empty({M, S * NB}, x.options());
  g.y = y.data_ptr<float>(), g.ldy = S * NB, g.S = S, g.panels = pp;
  run(quantize_rows(x), M, K, {g});
  return y;
}

#else  // built for a CPU without VNNI: Python never routes these GEMMs here (tandem.kernels._ext.has_vnni)
torch::Tensor gemm_vnni(torch::Tensor, std::string, std::vector<torch::Tensor>, int64_t) {
  TORCH_CHECK(false, "VNNI GEMM needs AVX-512 VNNI");
}
torch::Tensor gemm_vnni_panels(torch::Tensor, std::string, std::vector<torch::Tensor>, int64_t, torch::Tensor) {
  TORCH_CHECK(false, "VNNI GEMM needs AVX-512 VNNI");
}
std::vector<torch::Tensor> gemm_vnni_multi(torch::Tensor, std::vector<std::string>,
                                           std::vector<std::vector<torch::Tensor>>, std::vector<int64_t>) {
  TORCH_CHECK(false, "VNNI GEMM needs AVX-512 VNNI");
}
#endif

void check_rows(const torch::Tensor& rows, int64_t n_rows);  // small_gemm.cpp

// Rows `rows` [R] (int64) of a q8_0x8 weight, dequantised to fp32 [R, K] (tied embedding lookup).
torch::Tensor rows_q8_0x8(torch::Tensor w, torch::Tensor d, torch::Tensor rows, int64_t K) {
  constexpr int64_t NB = 64;
  TORCH_CHECK(w.numel() == w.size(0) * K * NB && d.numel() == w.size(0) * (K / 32) * NB, "q8_0x8 weight size");
  check_rows(rows, w.size(0) * NB);
  const int64_t R = rows.numel();
  const int64_t* rp = rows.data_ptr<int64_t>();
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
