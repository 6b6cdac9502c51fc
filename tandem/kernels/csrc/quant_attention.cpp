// Fused dequantize-while-attending over the quantized KV cache (Tandem); write side in kv_quantize.cpp.
//
// Formats as tandem/kernels/quant_attention.py: q8_0 int8 codes; turbo4/3/2 packed planes of unsigned mid-rise
// codes in a Walsh-Hadamard rotated basis; one fp16 scale per block of 32 values. Either side may be plain
// f32/bf16/f16 instead. Entries are dequantised exactly as quant_attention.dequantize (same fp32 ops), into an L1 tile
// shared by every query row of the kv head, so the bytes streamed from memory are the quantized ones.
//
// Row invariance by construction: keys are cut into chunks of CH positions aligned to absolute multiples of CH and
// tiles of 16 aligned to multiples of 16 (key j always sits in lane j % 16). A row's partial softmax over a chunk
// (max m, sum l, unnormalised o) depends only on its own q, its own visible range and the cache; partials are folded
// in ascending chunk order by one function. Decode/verify (few rows) runs chunks in parallel, prefill runs row
// blocks; both use the same partial and fold, so a row is bitwise identical for any T, B, mode or thread split.
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

constexpr int64_t CH = 256;      // keys per chunk: the unit of a row's partial softmax
constexpr int64_t SMALL_R = 64;  // rows per (b, kv head) up to which chunks run in parallel (decode / verify)
constexpr int64_t RB = 32;       // rows per work item above that (prefill)
using namespace kvq;  // Side, load_entry, mask16, lanes

// exp for x <= 0 (as attention.cpp)
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 16 accumulators (one per key) -> one vector whose lane k is the horizontal sum of acc[k] (fixed tree per lane)
static inline __m512 hsum16(const __m512 (&a)[16]) {
  __m512 w[8], u[4], z[2];
  for (int i = 0; i < 8; ++i)  // key 2i in quarters 0-1, 2i+1 in 2-3
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // quarter j = key 4i + j
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);  // lane 4j+m = key 4m+j
  return _mm512_permutexvar_ps(idx, r);
}

// q . k for the 16 keys of a tile kt [dp/16][16 keys][16 values]: one FMA chain per key over d
static inline __m512 tile_scores(const float* q, const float* kt, int64_t dp) {
  __m512 acc[16];
  for (int k = 0; k < 16; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t i = 0; i < dp; i += 16, kt += 256) {
    const __m512 qv = _mm512_loadu_ps(q + i);
    for (int k = 0; k < 16; ++k) acc[k] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kt + 16 * k), acc[k]);
  }
  return hsum16(acc);
}

struct Scratch {
  std::vector<float> kt, vt, sc;  // K tile [dp/16][16][16], V tile [16][dvp], scores [rows][CH]
  std::vector<uint8_t> cb;        // unpacked codes of one entry
  Scratch(int64_t dp, int64_t dvp, int64_t rows)
      : kt(16 * dp, 0.0f), vt(16 * dvp, 0.0f), sc(rows * CH), cb(std::max(dp, dvp) + 64) {}
};

// o[r] += sum_j e[j] v[j] over keys ka <= j < kb of the V tile starting at t0; per element one FMA per key in order
static inline void accumulate_v(float* o, const float* e, const float* vt, int64_t t0, int64_t ka, int64_t kb,
                                int64_t dvp) {
  int64_t dd = 0;
  for (; dd + 128 <= dvp; dd += 128) {
    __m512 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_loadu_ps(o + dd + 16 * i);
    for (int64_t j = ka; j < kb; ++j) {
      const __m512 eb = _mm512_set1_ps(e[j]);
      const float* vr = vt + (j - t0) * dvp + dd;
      for (int i = 0; i < 8; ++i) acc[i] = _mm512_fmadd_ps(eb, _mm512_loadu_ps(vr + 16 * i), acc[i]);
    }
    for (int i = 0; i < 8; ++i) _mm512_storeu_ps(o + dd + 16 * i, acc[i]);
  }
  for (; dd < dvp; dd += 16) {
    __m512 acc = _mm512_loadu_ps(o + dd);
    for (int64_t j = ka; j < kb; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(e[j]), _mm512_loadu_ps(vt + (j - t0) * dvp + dd), acc);
    _mm512_storeu_ps(o + dd, acc);
  }
}

// Partial softmax of rows [0, nr) over chunk c: m[r] (-inf: no visible key), l[r], o[r * dvp, +dvp).
// q [nr][dp] (rotated for a rotated K); lo/hi: each row's visible keys, inclusive; ebase: entry index of key 0.
__attribute__((noinline)) void chunk_partial(const Side& K, const Side& V, int64_t ebase, int64_t c, int64_t Tmax,
                                             const float* q, const int64_t* lo, const int64_t* hi, int64_t nr,
                                             float scale, float cap, Scratch& w, float* m, float* l, float* o) {
  const int64_t j0 = c * CH, j1 = std::min(j0 + CH, Tmax), dp = K.dp, dvp = V.dp;
  int64_t kmin = j1, kmax = j0;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t a = std::max(lo[r], j0), b = std::min(hi[r] + 1, j1);
    m[r] = -INFINITY;
    l[r] = 0.0f;
    if (a < b) kmin = std::min(kmin, a), kmax = std::max(kmax, b);
  }
  if (kmin >= kmax) return;
  float* sc = w.sc.data();
  for (int64_t t0 = kmin & ~15LL; t0 < kmax; t0 += 16) {  // scores, tile by tile
    for (int64_t k = 0; k < 16; ++k) {
      float* kk = w.kt.data() + 16 * k;
      if (t0 + k >= kmin && t0 + k < kmax) load_entry<256>(K, ebase + t0 + k, kk, w.cb.data());
      else for (int64_t i = 0; i < dp; i += 16) _mm512_storeu_ps(kk + 16 * i, _mm512_setzero_ps());
    }
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t a = std::max(lo[r], j0), b = std::min(hi[r] + 1, j1);
      if (a >= b || b <= t0 || a >= t0 + 16) continue;
      __m512 s = _mm512_mul_ps(tile_scores(q + r * dp, w.kt.data(), dp), _mm512_set1_ps(scale));
      float* dst = sc + r * CH + (t0 - j0);
      _mm512_storeu_ps(dst, s);
      if (cap > 0.0f)
        for (int k = 0; k < 16; ++k) dst[k] = std::tanh(dst[k] / cap) * cap;
    }
  }
  for (int64_t r = 0; r < nr; ++r) {  // exp and sum per row over its own keys
    const int64_t a = std::max(lo[r], j0), b = std::min(hi[r] + 1, j1);
    if (a >= b) continue;
    float* s = sc + r * CH - j0;  // indexed by absolute key position
    __m512 vm = _mm512_set1_ps(-INFINITY);
    for (int64_t t0 = a & ~15LL; t0 < b; t0 += 16) vm = _mm512_mask_max_ps(vm, lanes(a - t0, b - t0), vm, _mm512_loadu_ps(s + t0));
    const float mx = _mm512_reduce_max_ps(vm);
    __m512 vs = _mm512_setzero_ps();
    for (int64_t t0 = a & ~15LL; t0 < b; t0 += 16) {
      const __mmask16 mk = lanes(a - t0, b - t0);
      const __m512 e = _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t0), _mm512_set1_ps(mx))));
      _mm512_storeu_ps(s + t0, e);
      vs = _mm512_add_ps(vs, e);
    }
    m[r] = mx;
    l[r] = _mm512_reduce_add_ps(vs);
    std::memset(o + r * dvp, 0, dvp * sizeof(float));
  }
  for (int64_t t0 = kmin & ~15LL; t0 < kmax; t0 += 16) {  // weighted V, tile by tile
    const int64_t ta = std::max(t0, kmin), tb = std::min(t0 + 16, kmax);
    for (int64_t j = ta; j < tb; ++j) load_entry<16>(V, ebase + j, w.vt.data() + (j - t0) * dvp, w.cb.data());
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t ka = std::max({lo[r], j0, t0}), kb = std::min({hi[r] + 1, j1, t0 + 16});
      if (ka < kb) accumulate_v(o + r * dvp, sc + r * CH - j0, w.vt.data(), t0, ka, kb, dvp);
    }
  }
}

// running state (M, L, O) <- chunk partial (m, l, o); called in ascending chunk order only
__attribute__((noinline)) void fold(float* M, float* L, float* O, float m, float l, const float* o, int64_t dvp) {
  if (m == -INFINITY) return;
  const float mn = std::max(*M, m), a = std::exp(*M - mn), b = std::exp(m - mn);
  *L = std::fma(*L, a, l * b);
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  for (int64_t d = 0; d < dvp; d += 16)
    _mm512_storeu_ps(O + d, _mm512_fmadd_ps(_mm512_loadu_ps(O + d), va, _mm512_mul_ps(_mm512_loadu_ps(o + d), vb)));
  *M = mn;
}

// out[0, Dv) = O / L, un-rotated for a rotated V
void finish(const Side& V, float L, float* O, float* out, double* t) {
  const __m512 vl = _mm512_set1_ps(L);
  for (int64_t d = 0; d < V.dp; d += 16) _mm512_storeu_ps(O + d, _mm512_div_ps(_mm512_loadu_ps(O + d), vl));
  if (V.signs) kv_rotate(O, V.signs, V.d, true, out, t);
  else std::memcpy(out, O, V.d * sizeof(float));
}

Side make_side(const torch::Tensor& data, const torch::Tensor& scales, int64_t kind, const torch::Tensor& signs,
               int64_t d) {
  TORCH_CHECK(data.dim() == 4 && data.is_contiguous(), "cache buffer: contiguous [S, H, Tmax, row]");
  Side s{(int)kind, reinterpret_cast<const uint8_t*>(data.data_ptr()), nullptr, data.size(3) * data.element_size(),
         0, d, d, (d + 15) & ~15LL, nullptr};
  if (kind >= F16) {
    TORCH_CHECK(kind == F16 || kind == BF16 || kind == F32, "unknown cache kind");
    const auto want = kind == F32 ? torch::kFloat32 : kind == BF16 ? torch::kBFloat16 : torch::kFloat16;
    TORCH_CHECK(data.scalar_type() == want && data.size(3) == d, "float cache buffer dtype/shape");
  } else {
    TORCH_CHECK(kind == 8 || kind == 4 || kind == 3 || kind == 2, "unknown cache kind");
    TORCH_CHECK(s.row_bytes == d * kind / 8 && d % 8 == 0, "codes row bytes");
    TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous() && scales.dim() == 4 &&
                scales.size(2) == data.size(2) && d % scales.size(3) == 0, "scales: fp16 [S, H, Tmax, nblk]");
    s.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr());
    s.nblk = scales.size(3);
    s.qb = d / s.nblk;
  }
  if (signs.numel()) {
    TORCH_CHECK(signs.scalar_type() == torch::kFloat32 && signs.numel() == d && signs.is_contiguous(), "signs");
    s.signs = signs.data_ptr<float>();
  }
  return s;
}

}  // namespace

// q [B,T,Hq,D] fp32; per side: data [S,Hkv,Tmax,row] (codes or float), scales fp16 [S,Hkv,Tmax,nblk] (or empty),
// kind (32 f32, 16 bf16, 15 f16, 8/4/3/2 quantized), rotation signs fp32 [d] (or empty); dv: V head dim.
// slots [B], q_pos [B,T] int64 (-1 = padding, sees entry 0); window/softcap <= 0: none. Returns fp32 [B,T,Hq,Dv].
torch::Tensor attend_quant(torch::Tensor q, torch::Tensor kd, torch::Tensor ks, int64_t kkind, torch::Tensor ksigns,
                           torch::Tensor vd, torch::Tensor vs, int64_t vkind, torch::Tensor vsigns, int64_t dv,
                           torch::Tensor slots, torch::Tensor q_pos, int64_t window, double scale, double softcap) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.is_contiguous() && q.dim() == 4, "q: contiguous fp32 [B,T,Hq,D]");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && q_pos.scalar_type() == torch::kInt64, "int64 slots/positions");
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t S = kd.size(0), Hkv = kd.size(1), Tmax = kd.size(2);
  TORCH_CHECK(vd.size(0) == S && vd.size(1) == Hkv && vd.size(2) == Tmax && Hq % Hkv == 0, "K/V shapes");
  const Side K = make_side(kd, ks, kkind, ksigns, D), V = make_side(vd, vs, vkind, vsigns, dv);
  const int64_t G = Hq / Hkv, R = T * G, dp = K.dp, dvp = V.dp;
  auto slots_c = slots.contiguous();
  auto pos_c = q_pos.contiguous();
  const int64_t* sp = slots_c.data_ptr<int64_t>();
  const int64_t* pp = pos_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(sp[b] >= 0 && sp[b] < S, "slot out of range");
  // visible keys per row (b, r = t * G + g): lo..hi inclusive; padding rows (p = -1) see entry 0
  std::vector<int64_t> lo(B * R), hi(B * R);
  for (int64_t i = 0; i < B * T; ++i) {
    TORCH_CHECK(pp[i] < Tmax, "position beyond cache length");
    const int64_t p = std::max<int64_t>(pp[i], 0), l0 = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    for (int64_t g = 0; g < G; ++g) lo[i * G + g] = l0, hi[i * G + g] = p;
  }
  // q rows grouped by kv head: [B, Hkv, R, dp], rotated once for a rotated K
  std::vector<float> qr(B * Hkv * R * dp, 0.0f);
  const float* qp = q.data_ptr<float>();
  at::parallel_for(0, B * T * Hq, 64, [&](int64_t i0, int64_t i1) {
    std::vector<double> t(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i % Hq, bt = i / Hq, b = bt / T, tt = bt % T;
      float* dst = qr.data() + ((b * Hkv + h / G) * R + tt * G + h % G) * dp;
      if (K.signs) kv_rotate(qp + i * D, K.signs, D, false, dst, t.data());
      else std::memcpy(dst, qp + i * D, D * sizeof(float));
    }
  });
  auto out = torch::empty({B, T, Hq, dv}, q.options());
  float* op = out.data_ptr<float>();
  const float fscale = (float)scale, cap = softcap > 0 ? (float)softcap : 0.0f;
  auto out_row = [&](int64_t b, int64_t h, int64_t r) { return op + ((b * T + r / G) * Hq + h * G + r % G) * dv; };
  auto ebase = [&](int64_t b, int64_t h) { return (sp[b] * Hkv + h) * Tmax; };
  auto crange = [&](int64_t b, int64_t r0, int64_t r1, int64_t& c0, int64_t& c1) {
    c0 = INT64_MAX, c1 = -1;
    for (int64_t r = r0; r < r1; ++r) c0 = std::min(c0, lo[b * R + r] / CH), c1 = std::max(c1, hi[b * R + r] / CH);
  };
  if (R <= SMALL_R) {  // decode / verify: every (b, kv head, chunk) in parallel, partials folded per row after
    std::vector<int64_t> cf(B), off(B + 1, 0);
    for (int64_t b = 0; b < B; ++b) {
      int64_t c0, c1;
      crange(b, 0, R, c0, c1);
      cf[b] = c0;
      off[b + 1] = off[b] + Hkv * (c1 - c0 + 1);
    }
    const int64_t stride = R * (2 + dvp);  // per item: m [R], l [R], o [R][dvp]
    std::vector<float> part(off[B] * stride);
    at::parallel_for(0, off[B], 1, [&](int64_t i0, int64_t i1) {
      Scratch w(dp, dvp, R);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = std::upper_bound(off.begin(), off.end(), i) - off.begin() - 1;
        const int64_t nc = (off[b + 1] - off[b]) / Hkv, h = (i - off[b]) / nc, c = cf[b] + (i - off[b]) % nc;
        float* P = part.data() + i * stride;
        chunk_partial(K, V, ebase(b, h), c, Tmax, qr.data() + (b * Hkv + h) * R * dp, lo.data() + b * R,
                      hi.data() + b * R, R, fscale, cap, w, P, P + R, P + 2 * R);
      }
    });
    at::parallel_for(0, B * Hkv * R, 16, [&](int64_t i0, int64_t i1) {
      std::vector<float> O(dvp);
      std::vector<double> t(dv);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = i % R, bh = i / R, b = bh / Hkv, h = bh % Hkv;
        const int64_t nc = (off[b + 1] - off[b]) / Hkv;
        float M = -INFINITY, L = 0.0f;
        std::fill(O.begin(), O.end(), 0.0f);
        for (int64_t k = 0; k < nc; ++k) {
          const float* P = part.data() + (off[b] + h * nc + k) * stride;
          fold(&M, &L, O.data(), P[r], P[R + r], P + 2 * R + r * dvp, dvp);
        }
        finish(V, L, O.data(), out_row(b, h, r), t.data());
      }
    });
  } else {  // prefill: blocks of RB rows in parallel, chunks folded as they are computed
    const int64_t nblk = (R + RB - 1) / RB;
    at::parallel_for(0, B * Hkv * nblk, 1, [&](int64_t i0, int64_t i1) {
      Scratch w(dp, dvp, RB);
      std::vector<float> M(RB), L(RB), O(RB * dvp), m(RB), l(RB), o(RB * dvp);
      std::vector<double> t(dv);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t blk = i % nblk, bh = i / nblk, b = bh / Hkv, h = bh % Hkv;
        const int64_t r0 = blk * RB, nr = std::min(RB, R - r0);
        int64_t c0, c1;
        crange(b, r0, r0 + nr, c0, c1);
        std::fill(M.begin(), M.end(), -INFINITY);
        std::fill(L.begin(), L.end(), 0.0f);
        std::fill(O.begin(), O.end(), 0.0f);
        for (int64_t c = c0; c <= c1; ++c) {
          chunk_partial(K, V, ebase(b, h), c, Tmax, qr.data() + ((b * Hkv + h) * R + r0) * dp, lo.data() + b * R + r0,
                        hi.data() + b * R + r0, nr, fscale, cap, w, m.data(), l.data(), o.data());
          for (int64_t r = 0; r < nr; ++r) fold(&M[r], &L[r], O.data() + r * dvp, m[r], l[r], o.data() + r * dvp, dvp);
        }
        for (int64_t r = 0; r < nr; ++r) finish(V, L[r], O.data() + r * dvp, out_row(b, h, r0 + r), t.data());
      }
    });
  }
  return out;
}
