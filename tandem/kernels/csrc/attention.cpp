// Batch-invariant attention over the position-indexed KV cache (Tandem), same semantics as attend_reference.
//
// Every query row (b, t, h) is computed on its own by the same code: scores over the entries it may see
// (p - window < j <= p; padding rows p = -1 see entry 0 only), fp32 softmax, weighted sum of V. Nothing of one
// row depends on other rows, on T, B or on the thread split, so a row is bitwise identical whether it is
// verified among k+1 tokens or decoded alone. K/V are read in place from the cache buffers by slot (no gather).
// Tree rows (a draft tree verified in one forward): entries >= tree_base[b] form the tree region, entry base+u
// seen by row t iff tree_mask[b, t, u] (its ancestors and itself) and tree_pos[b, u] is inside the window. The
// visible entries are walked in index order through a list, so a node sees the same keys in the same order as
// the chain of its ancestors would: its arithmetic is bitwise the chain's.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

template <typename T> static inline __m512 load16(const T* p);
template <> inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load16<uint16_t>(const uint16_t* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
template <typename T> static inline __m512 load16m(const T* p, __mmask16 m);
template <> inline __m512 load16m<float>(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
template <> inline __m512 load16m<uint16_t>(const uint16_t* p, __mmask16 m) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

static inline __mmask16 tail_mask(int64_t c) { return c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << c) - 1); }

// exp for x <= 0 (cephes-style range reduction + degree-6 polynomial; ~1-2 ulp)
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
  __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

template <typename T>
static void attend_row(const float* q, const T* kbase, const T* vbase, int64_t D, int64_t Dv, int64_t lo,
                       int64_t hi, const int64_t* idx, float scale, float cap, float* sbuf, float* out) {
  // entries lo..hi, or (idx != nullptr) the L = hi - lo + 1 entries idx[0..L-1]
  const int64_t L = hi - lo + 1;
  auto entry = [&](int64_t j) { return idx ? idx[j] : lo + j; };
  // scores: one dot product per visible entry, fixed 4-accumulator order over D
  for (int64_t j = 0; j < L; ++j) {
    const T* kj = kbase + entry(j) * D;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(kj + d), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d + 16), load16(kj + d + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d + 32), load16(kj + d + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d + 48), load16(kj + d + 48), a3);
    }
    for (; d < D; d += 16) {
      __mmask16 m = tail_mask(D - d);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), load16m(kj + d, m), a0);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) * scale;
    if (cap > 0.0f) s = std::tanh(s / cap) * cap;
    sbuf[j] = s;
  }
  float mx = -INFINITY;
  for (int64_t j = 0; j < L; ++j) mx = std::max(mx, sbuf[j]);
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; j += 16) {
    __mmask16 m = tail_mask(L - j);
    __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sbuf + j), vmx)));
    _mm512_mask_storeu_ps(sbuf + j, m, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(vsum);
  // out = (sum_j e_j v_j) / sum, 64 output lanes at a time, sequential over j
  for (int64_t d = 0; d < Dv; d += 64) {
    const int64_t w = std::min<int64_t>(64, Dv - d);
    __m512 o0 = _mm512_setzero_ps(), o1 = _mm512_setzero_ps(), o2 = _mm512_setzero_ps(), o3 = _mm512_setzero_ps();
    if (w == 64) {
      for (int64_t j = 0; j < L; ++j) {
        const T* vj = vbase + entry(j) * Dv + d;
        __m512 e = _mm512_set1_ps(sbuf[j]);
        o0 = _mm512_fmadd_ps(e, load16(vj), o0);
        o1 = _mm512_fmadd_ps(e, load16(vj + 16), o1);
        o2 = _mm512_fmadd_ps(e, load16(vj + 32), o2);
        o3 = _mm512_fmadd_ps(e, load16(vj + 48), o3);
      }
      __m512 vi = _mm512_set1_ps(inv);
      _mm512_storeu_ps(out + d, _mm512_mul_ps(o0, vi));
      _mm512_storeu_ps(out + d + 16, _mm512_mul_ps(o1, vi));
      _mm512_storeu_ps(out + d + 32, _mm512_mul_ps(o2, vi));
      _mm512_storeu_ps(out + d + 48, _mm512_mul_ps(o3, vi));
    } else {
      for (int64_t c = 0; c < w; c += 16) {
        __mmask16 m = tail_mask(w - c);
        __m512 o = _mm512_setzero_ps();
        for (int64_t j = 0; j < L; ++j) o = _mm512_fmadd_ps(_mm512_set1_ps(sbuf[j]), load16m(vbase + entry(j) * Dv + d + c, m), o);
        _mm512_mask_storeu_ps(out + d + c, m, _mm512_mul_ps(o, _mm512_set1_ps(inv)));
      }
    }
  }
}

}  // namespace

// q [B,T,Hq,D] fp32; k_buf [S,Hkv,Tmax,D], v_buf [S,Hkv,Tmax,Dv] fp32 or bf16 (contiguous); slots [B] int64;
// q_pos [B,T] int64; window <= 0: none; softcap <= 0: none. Tree rows: tree_base [B] int64, tree_pos [B,M] int64
// (the position of region entry base+u), tree_mask [B,T,M] bool. Returns fp32 [B,T,Hq,Dv].
torch::Tensor attend_fast(torch::Tensor q, torch::Tensor k_buf, torch::Tensor v_buf, torch::Tensor slots,
                          torch::Tensor q_pos, int64_t window, double scale, double softcap,
                          std::optional<torch::Tensor> tree_base, std::optional<torch::Tensor> tree_pos,
                          std::optional<torch::Tensor> tree_mask) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.is_contiguous() && q.dim() == 4, "q: contiguous fp32 [B,T,Hq,D]");
  TORCH_CHECK(k_buf.is_contiguous() && v_buf.is_contiguous() && k_buf.scalar_type() == v_buf.scalar_type(), "cache");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && q_pos.scalar_type() == torch::kInt64, "int64 slots/positions");
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t S = k_buf.size(0), Hkv = k_buf.size(1), Tmax = k_buf.size(2), Dv = v_buf.size(3);
  TORCH_CHECK(k_buf.size(3) == D && Hq % Hkv == 0, "shape mismatch");
  const int64_t group = Hq / Hkv;
  auto slots_c = slots.contiguous();
  auto pos_c = q_pos.contiguous();
  const int64_t* sp = slots_c.data_ptr<int64_t>();
  const int64_t* pp = pos_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(sp[b] >= 0 && sp[b] < S, "slot out of range");
  for (int64_t i = 0; i < B * T; ++i) TORCH_CHECK(pp[i] < Tmax, "position beyond cache length");
  const bool tree = tree_base.has_value();
  torch::Tensor tb, tp, tm;
  int64_t M = 0;
  if (tree) {
    TORCH_CHECK(tree_pos.has_value() && tree_mask.has_value(), "tree: tree_base, tree_pos and tree_mask together");
    tb = tree_base->to(torch::kInt64).contiguous();
    tp = tree_pos->to(torch::kInt64).contiguous();
    tm = tree_mask->to(torch::kBool).contiguous();
    M = tp.size(1);
    TORCH_CHECK(tb.numel() == B && tp.size(0) == B && tm.dim() == 3 && tm.size(0) == B && tm.size(1) == T &&
                tm.size(2) == M, "tree: tree_base [B], tree_pos [B,M], tree_mask [B,T,M]");
    const int64_t* t0 = tb.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(t0[b] >= 0 && t0[b] + M <= Tmax, "tree region beyond the cache");
  }
  const int64_t* tbp = tree ? tb.data_ptr<int64_t>() : nullptr;
  const int64_t* tpp = tree ? tp.data_ptr<int64_t>() : nullptr;
  const bool* tmp = tree ? tm.data_ptr<bool>() : nullptr;
  auto out = torch::empty({B, T, Hq, Dv}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool is_bf16 = k_buf.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(is_bf16 || k_buf.scalar_type() == torch::kFloat32, "cache dtype must be fp32 or bf16");
  const float fscale = (float)scale, cap = softcap > 0 ? (float)softcap : 0.0f;
  at::parallel_for(0, B * T * Hq, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> sbuf;
    std::vector<int64_t> idx;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % Hq, bt = r / Hq, b = bt / T;
      const int64_t p = pp[bt];
      int64_t lo = 0, hi = 0;
      if (p >= 0) {
        hi = p;
        lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
      }
      const int64_t* ip = nullptr;
      if (tree && p >= 0) {  // the entries before the region, then the region's visible ones, in index order
        const int64_t base = tbp[b];
        idx.clear();
        for (int64_t j = lo; j < std::min(base, p + 1); ++j) idx.push_back(j);
        for (int64_t u = 0; u < M; ++u)
          if (tmp[bt * M + u] && (window <= 0 || tpp[b * M + u] > p - window)) idx.push_back(base + u);
        TORCH_CHECK(!idx.empty(), "tree row sees no entry");
        ip = idx.data();
        lo = 0;
        hi = (int64_t)idx.size() - 1;
      }
      sbuf.resize((size_t)(hi - lo + 1 + 16));
      const int64_t kv_off = (sp[b] * Hkv + h / group) * Tmax;
      if (is_bf16) {
        const uint16_t* kb = reinterpret_cast<const uint16_t*>(k_buf.data_ptr()) + kv_off * D;
        const uint16_t* vb = reinterpret_cast<const uint16_t*>(v_buf.data_ptr()) + kv_off * Dv;
        attend_row<uint16_t>(qp + r * D, kb, vb, D, Dv, lo, hi, ip, fscale, cap, sbuf.data(), op + r * Dv);
      } else {
        const float* kb = k_buf.data_ptr<float>() + kv_off * D;
        const float* vb = v_buf.data_ptr<float>() + kv_off * Dv;
        attend_row<float>(qp + r * D, kb, vb, D, Dv, lo, hi, ip, fscale, cap, sbuf.data(), op + r * Dv);
      }
    }
  });
  return out;
}

void kv_write(torch::Tensor buf, torch::Tensor x, torch::Tensor slots, torch::Tensor positions);  // glue.cpp

// One layer's cache step in one call: k, v [B, T, Hkv, D] (any float dtype) stored at (slots, positions), then
// attend_fast of q at those positions; bitwise kv_write twice + attend_fast. Tree rows: stored at `index` (the
// region entries), attended with the tree arguments of attend_fast.
torch::Tensor write_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_buf, torch::Tensor v_buf,
                           torch::Tensor slots, torch::Tensor positions, int64_t window, double scale,
                           double softcap, std::optional<torch::Tensor> index,
                           std::optional<torch::Tensor> tree_base, std::optional<torch::Tensor> tree_pos,
                           std::optional<torch::Tensor> tree_mask) {
  const auto sl = slots.to(torch::kInt64), pos = positions.to(torch::kInt64);
  const auto at = index.has_value() ? index->to(torch::kInt64) : pos;
  kv_write(k_buf, k.to(k_buf.scalar_type()).contiguous(), sl, at);
  kv_write(v_buf, v.to(v_buf.scalar_type()).contiguous(), sl, at);
  return attend_fast(q.contiguous(), k_buf, v_buf, sl, pos, window, scale, softcap, tree_base, tree_pos, tree_mask);
}
