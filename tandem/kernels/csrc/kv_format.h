// Quantized KV cache entries -> fp32 (Tandem), for csrc/quant_attention.cpp. Layouts of
// tandem/kernels/quant_attention.py: q8_0 int8 codes; turbo4/3/2 packed planes of unsigned mid-rise codes in the
// rotated basis; one fp16 scale per block of 32 values (or of d when d < 32).
#pragma once
#include <immintrin.h>
#include <algorithm>
#include <cstdint>

// x @ M (back=false) or x @ M^T (back=true), M = diag(signs) . blockdiag(H_g / sqrt(g)), in double (kv_quantize.cpp)
void kv_rotate(const float* x, const float* sg, int64_t d, bool back, float* y, double* t);

namespace kvq {

constexpr int F16 = 15, BF16 = 16, F32 = 32;  // float kinds; quantized kinds are their bit widths 8, 4, 3, 2

struct Side {  // K or V of one layer: entries [S, H, Tmax] of row_bytes each
  int kind;
  const uint8_t* data;
  const uint16_t* scales;          // fp16 [S, H, Tmax, nblk] for quantized kinds
  int64_t row_bytes, nblk, qb, d, dp;  // dp: d rounded up to 16 (tile row stride, zero padded)
  const float* signs;              // rotation signs [d], nullptr when not rotated
};

inline __mmask16 mask16(int64_t c) { return c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << c) - 1); }
inline __mmask16 lanes(int64_t a, int64_t b) {  // lanes a <= k < b of 16 (a, b may lie outside 0..16)
  return (__mmask16)(mask16(std::max<int64_t>(b, 0)) & ~mask16(std::max<int64_t>(a, 0)));
}

// -- unpack / dequantize -----------------------------------------------------------------------------------------
// packed planes -> one code byte per value (inverse of quant_attention._pack: a b-bit plane splits D into 8/b
// contiguous parts, part i at bit b*i of each byte; turbo3 = 2-bit plane (low bits) then 1-bit plane)
inline void unpack(const uint8_t* p, int bits, int64_t d, uint8_t* c) {
  const int planes[2] = {bits == 3 ? 2 : bits, bits == 3 ? 1 : 0};
  int shift = 0;
  for (int pi = 0; pi < 2 && planes[pi]; ++pi) {
    const int b = planes[pi], n = 8 / b;
    const int64_t nb = d * b / 8;
    const __m512i msk = _mm512_set1_epi8((char)((1 << b) - 1));
    for (int64_t o = 0; o < nb; o += 64) {
      const __mmask64 m = nb - o >= 64 ? ~0ULL : ((1ULL << (nb - o)) - 1);
      const __m512i x = _mm512_maskz_loadu_epi8(m, p + o);
      for (int i = 0; i < n; ++i) {
        __m512i v = _mm512_and_si512(_mm512_srl_epi16(x, _mm_cvtsi32_si128(b * i)), msk);
        uint8_t* dst = c + i * nb + o;
        if (shift) v = _mm512_or_si512(_mm512_sll_epi16(v, _mm_cvtsi32_si128(shift)), _mm512_maskz_loadu_epi8(m, dst));
        _mm512_mask_storeu_epi8(dst, m, v);
      }
    }
    p += nb;
    shift += b;
  }
}

// fast path (d % 128 == 0: every 16-value group of a plane lies in one scale block and one byte run): codes straight
// from the packed bytes, (code - half) * scale in fp32 as quant_attention.dequantize; values 16i.. go to out + i * GS
template <int BITS, int64_t GS>
inline void dequant_fast(const uint8_t* p, const uint16_t* sc, int64_t d, float* out) {
  __m512 sv[4];  // fp32 scales in registers, 16 blocks per vector (d <= 2048)
  for (int64_t b = 0; b < d / 32; b += 16)
    sv[b >> 4] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(d / 32 - b), sc + b));
  auto scale = [&](int64_t dim) { return _mm512_permutexvar_ps(_mm512_set1_epi32((int)((dim >> 5) & 15)), sv[dim >> 9]); };
  const __m512 half = _mm512_set1_ps((float)((1 << BITS) - 1) / 2);
  auto put = [&](int64_t dim, __m512i c, __m512 s) {
    __m512 v = _mm512_cvtepi32_ps(c);
    if (BITS != 8) v = _mm512_sub_ps(v, half);
    _mm512_storeu_ps(out + (dim >> 4) * GS, _mm512_mul_ps(v, s));
  };
  auto u8 = [](const uint8_t* x) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); };
  const __m512i m1 = _mm512_set1_epi32(1), m2 = _mm512_set1_epi32(3), m4 = _mm512_set1_epi32(15);
  // 32 plane bytes per step: each part of the plane then covers one whole scale block
  if (BITS == 8) {
    for (int64_t o = 0; o < d; o += 32) {
      const __m512 s = scale(o);
      for (int64_t h = o; h < o + 32; h += 16)
        put(h, _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + h))), s);
    }
  } else if (BITS == 4) {
    for (int64_t o = 0, nb = d / 2; o < nb; o += 32) {
      const __m512 s0 = scale(o), s1 = scale(nb + o);
      for (int64_t h = o; h < o + 32; h += 16) {
        const __m512i w = u8(p + h);
        put(h, _mm512_and_si512(w, m4), s0);
        put(nb + h, _mm512_srli_epi32(w, 4), s1);
      }
    }
  } else if (BITS == 2) {
    for (int64_t o = 0, nb = d / 4; o < nb; o += 32) {
      const __m512 s0 = scale(o), s1 = scale(nb + o), s2 = scale(2 * nb + o), s3 = scale(3 * nb + o);
      for (int64_t h = o; h < o + 32; h += 16) {
        const __m512i w = u8(p + h);
        put(h, _mm512_and_si512(w, m2), s0);
        put(nb + h, _mm512_and_si512(_mm512_srli_epi32(w, 2), m2), s1);
        put(2 * nb + h, _mm512_and_si512(_mm512_srli_epi32(w, 4), m2), s2);
        put(3 * nb + h, _mm512_srli_epi32(w, 6), s3);
      }
    }
  } else {  // 3 bits: 2-bit plane (d/4 bytes), then 1-bit plane (d/8 bytes, code j at byte j % (d/8), bit j / (d/8))
    const int64_t nb = d / 4, nb1 = d / 8;
    for (int64_t o = 0; o < nb; o += 32) {
      const __m512 s0 = scale(o), s1 = scale(nb + o), s2 = scale(2 * nb + o), s3 = scale(3 * nb + o);
      for (int64_t h = o; h < o + 32; h += 16) {  // 16 bytes never straddle nb1 (a multiple of 16)
        const __m512i w = u8(p + h), hb = _mm512_srl_epi32(u8(p + nb + h % nb1), _mm_cvtsi32_si128(h >= nb1));
        auto code = [&](int k) {  // low 2 bits from the 2-bit plane, bit 2 from the 1-bit plane
          const __m512i lo2 = _mm512_and_si512(_mm512_srli_epi32(w, 2 * k), m2);
          return _mm512_or_si512(lo2, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hb, 2 * k), m1), 2));
        };
        put(h, code(0), s0);
        put(nb + h, code(1), s1);
        put(2 * nb + h, code(2), s2);
        put(3 * nb + h, code(3), s3);
      }
    }
  }
}

// entry e (flat index into [S, H, Tmax]) -> fp32, bitwise as quant_attention.dequantize, zero past d; values
// 16i..16i+15 go to out + i * GS (GS = 16: contiguous; larger: interleaved tiles)
template <int64_t GS>
inline void load_entry(const Side& s, int64_t e, float* out, uint8_t* cb) {
  const uint8_t* p = s.data + e * s.row_bytes;
  if (s.kind >= F16) {
    for (int64_t i = 0; i < s.dp; i += 16) {
      const __mmask16 m = mask16(s.d - i);
      __m512 v;
      if (s.kind == F32) {
        v = _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(p) + i);
      } else {
        __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p) + i);
        v = s.kind == F16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
      _mm512_storeu_ps(out + (i >> 4) * GS, v);
    }
    return;
  }
  const uint16_t* sc = s.scales + e * s.nblk;
  if (s.d % 128 == 0 && s.d <= 2048) {
    switch (s.kind) {
      case 8: return dequant_fast<8, GS>(p, sc, s.d, out);
      case 4: return dequant_fast<4, GS>(p, sc, s.d, out);
      case 3: return dequant_fast<3, GS>(p, sc, s.d, out);
      default: return dequant_fast<2, GS>(p, sc, s.d, out);
    }
  }
  const uint8_t* c = p;  // other head dims: unpack to bytes first
  if (s.kind != 8) {
    unpack(p, s.kind, s.d, cb);
    c = cb;
  }
  const __m512 half = _mm512_set1_ps((float)((1 << s.kind) - 1) / 2);
  for (int64_t i = 0; i < s.dp; i += 16) {
    const __mmask16 m = mask16(s.d - i);
    const __m128i b = _mm_maskz_loadu_epi8(m, c + i);
    __m512 v = _mm512_cvtepi32_ps(s.kind == 8 ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
    if (s.kind != 8) v = _mm512_sub_ps(v, half);  // (code - half) * scale, mid-rise
    const float scale = _cvtsh_ss(sc[s.nblk == 1 ? 0 : i >> 5]);  // qb is 32, or d (one block)
    _mm512_storeu_ps(out + (i >> 4) * GS, _mm512_maskz_mul_ps(m, v, _mm512_set1_ps(scale)));
  }
}

}  // namespace kvq
