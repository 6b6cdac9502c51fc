// The GGUF weight formats of csrc/vnni_gemm.cpp: per format the unsigned bytes u of two 4-k groups of 16 columns
// (w) and the per-column scales a, b of one scale group (scales), w = a * (u - OFF) - b (b only where HAS_B).
// Each format reads its streams (tandem/kernels/kquants.py STREAMS), already offset to one 64-column panel.
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace vnni {

constexpr int NB = 64;  // columns per panel

static inline __m512 ph16(const uint16_t* p) {  // 16 fp16 -> fp32
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline __m512 u8f(const uint8_t* p) {  // 16 u8 -> fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline __m512 i8f(const uint8_t* p) {  // 16 i8 -> fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline const uint16_t* h16(const uint8_t* p) { return reinterpret_cast<const uint16_t*>(p); }

// bit planes: o = (kb*4 + gp)*4 + j indexes a pair of groups (2gp, 2gp+1) of column chunk j
static inline void nibbles(const uint8_t* p, int64_t o, __m512i& a, __m512i& b) {  // 64 bytes: low | high << 4
  const __m512i z = _mm512_loadu_si512(p + o * 64), m = _mm512_set1_epi8(0x0F);
  a = _mm512_and_si512(z, m);
  b = _mm512_and_si512(_mm512_srli_epi16(z, 4), m);
}
static inline void crumbs(const uint8_t* p, int64_t o, __m512i& a, __m512i& b) {  // 32 bytes: A, A+32, B, B+32
  const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + o * 32));
  const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(y), _mm256_srli_epi16(y, 2), 1);
  const __m512i m = _mm512_set1_epi8(0x03);
  a = _mm512_and_si512(z, m);
  b = _mm512_and_si512(_mm512_srli_epi16(z, 4), m);
}
static inline void hbit(const uint8_t* p, int64_t kb, int gp, int j, char add, __m512i& a, __m512i& b) {
  const uint64_t* h = reinterpret_cast<const uint64_t*>(p) + (kb * 8 + 2 * gp) * 4 + j;  // u64 [KB][8][4]
  a = _mm512_mask_add_epi8(a, _cvtu64_mask64(h[0]), a, _mm512_set1_epi8(add));
  b = _mm512_mask_add_epi8(b, _cvtu64_mask64(h[4]), b, _mm512_set1_epi8(add));
}

struct Q8 {  // u8 [KB][8][4][64], d fp16 [KB][64]
  static constexpr int SG = 32, OFF = 128; static constexpr bool HAS_B = false;
  const uint8_t* const* s;
  void w(int64_t kb, int gp, int j, __m512i& a, __m512i& b) const {
    a = _mm512_loadu_si512(s[0] + ((kb * 8 + 2 * gp) * 4 + j) * 64);
    b = _mm512_loadu_si512(s[0] + ((kb * 8 + 2 * gp + 1) * 4 + j) * 64);
  }
  void scales(int64_t kb, int, int j, __m512& a, __m512&) const { a = ph16(h16(s[1]) + kb * NB + 16 * j); }
};

template <int OFF_>  // Q4_0 (8), Q5_0 (16, with hbit): nib, [hbit,] d fp16 [KB][64]
struct QLegacy {
  static constexpr int SG = 32, OFF = OFF_; static constexpr bool HAS_B = false;
  static constexpr int D = OFF_ == 16 ? 2 : 1;
  const uint8_t* const* s;
  void w(int64_t kb, int gp, int j, __m512i& a, __m512i& b) const {
    nibbles(s[0], (kb * 4 + gp) * 4 + j, a, b);
    if (OFF_ == 16) hbit(s[1], kb, gp, j, 16, a, b);
  }
  void scales(int64_t kb, int, int j, __m512& a, __m512&) const { a = ph16(h16(s[D]) + kb * NB + 16 * j); }
};

template <bool Q5>  // Q4_1 / Q5_1: nib, [hbit,] d/m fp16 [KB][2][64]; w = d * u + m, so b = -m
struct QMin {
  static constexpr int SG = 32, OFF = 0; static constexpr bool HAS_B = true;
  const uint8_t* const* s;
  void w(int64_t kb, int gp, int j, __m512i& a, __m512i& b) const {
    nibbles(s[0], (kb * 4 + gp) * 4 + j, a, b);
    if (Q5) hbit(s[1], kb, gp, j, 16, a, b);
  }
  void scales(int64_t kb, int, int j, __m512& a, __m512& b) const {
    const uint16_t* dm = h16(s[Q5 ? 2 : 1]) + kb * 2 * NB + 16 * j;
    a = ph16(dm);
    b = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(ph16(dm + NB)), _mm512_set1_epi32(INT32_MIN)));
  }
};

template <bool Q5>  // Q4_K / Q5_K: nib, [hbit,] sc u8 [KB][64], m u8 [KB][64], d/dmin fp16 [K/256][2][64]
struct QK45 {
  static constexpr int SG = 32, OFF = 0; static constexpr bool HAS_B = true;
  static constexpr int S = Q5 ? 2 : 1;
  const uint8_t* const* s;
  void w(int64_t kb, int gp, int j, __m512i& a, __m512i& b) const {
    nibbles(s[0], (kb * 4 + gp) * 4 + j, a, b);
    if (Q5) hbit(s[1], kb, gp, j, 16, a, b);
  }
  void scales(int64_t kb, int, int j, __m512& a, __m512& b) const {
    const uint16_t* dd = h16(s[S + 2]) + (kb / 8) * 2 * NB + 16 * j;
    a = _mm512_mul_ps(ph16(dd), u8f(s[S] + kb * NB + 16 * j));
    b = _mm512_mul_ps(ph16(dd + NB), u8f(s[S + 1] + kb * NB + 16 * j));
  }
};

struct Q6K {  // nib, crumbs (bits 4-5), sc i8 [K/16][64], d fp16 [K/256][64]
  static constexpr int SG = 16, OFF = 32; static constexpr bool HAS_B = false;
  const uint8_t* const* s;
  void w(int64_t kb, int gp, int j, __m512i& a, __m512i& b) const {
    const int64_t o = (kb * 4 + gp) * 4 + j;
    nibbles(s[0], o, a, b);
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s[1] + o * 32));
    const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(y), _mm256_srli_epi16(y, 2), 1);
    const __m512i m = _mm512_set1_epi8(0x30);  // a | (t & m): ternary-logic table 0xF8
    a = _mm512_ternarylogic_epi64(a, _mm512_slli_epi16(z, 4), m, 0xF8);
    b = _mm512_ternarylogic_epi64(b, z, m, 0xF8);
  }
  void scales(int64_t kb, int h, int j, __m512& a, __m512&) const {
    a = _mm512_mul_ps(ph16(h16(s[3]) + (kb / 8) * NB + 16 * j), i8f(s[2] + (2 * kb + h) * NB + 16 * j));
  }
};

struct Q3K {  // crumbs (bits 0-1), hbit (+4), sc i8 [K/16][64] (scale - 32), d fp16 [K/256][64]
  static constexpr int SG = 16, OFF = 4; static constexpr bool HAS_B = false;
  const uint8_t* const* s;
  void w(int64_t kb, int gp, int j, __m512i& a, __m512i& b) const {
    crumbs(s[0], (kb * 4 + gp) * 4 + j, a, b);
    hbit(s[1], kb, gp, j, 4, a, b);
  }
  void scales(int64_t kb, int h, int j, __m512& a, __m512&) const {
    a = _mm512_mul_ps(ph16(h16(s[3]) + (kb / 8) * NB + 16 * j), i8f(s[2] + (2 * kb + h) * NB + 16 * j));
  }
};

struct Q2K {  // crumbs, sc u8 [K/16][64] (scale | min << 4 as stored), d/dmin fp16 [K/256][2][64]
  static constexpr int SG = 16, OFF = 0; static constexpr bool HAS_B = true;
  const uint8_t* const* s;
  void w(int64_t kb, int gp, int j, __m512i& a, __m512i& b) const { crumbs(s[0], (kb * 4 + gp) * 4 + j, a, b); }
  void scales(int64_t kb, int h, int j, __m512& a, __m512& b) const {
    const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
        s[1] + (2 * kb + h) * NB + 16 * j)));
    const uint16_t* dd = h16(s[2]) + (kb / 8) * 2 * NB + 16 * j;
    a = _mm512_mul_ps(ph16(dd), _mm512_cvtepi32_ps(_mm512_and_si512(sc, _mm512_set1_epi32(15))));
    b = _mm512_mul_ps(ph16(dd + NB), _mm512_cvtepi32_ps(_mm512_srli_epi32(sc, 4)));
  }
};

template <bool XS>  // IQ4_NL: nib, d fp16 [KB][64]; IQ4_XS: nib, sc i8 [KB][64] (scale - 32), d fp16 [K/256][64]
struct IQ4 {
  static constexpr int SG = 32, OFF = 128; static constexpr bool HAS_B = false;
  const uint8_t* const* s;
  void w(int64_t kb, int gp, int j, __m512i& a, __m512i& b) const {
    const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(  // kvalues_iq4nl + 128
        1, 24, 45, 63, 79, 93, 106, 118, (char)129, (char)141, (char)153, (char)166, (char)181, (char)197,
        (char)217, (char)241));
    nibbles(s[0], (kb * 4 + gp) * 4 + j, a, b);
    a = _mm512_shuffle_epi8(lut, a);
    b = _mm512_shuffle_epi8(lut, b);
  }
  void scales(int64_t kb, int, int j, __m512& a, __m512&) const {
    if (XS) a = _mm512_mul_ps(ph16(h16(s[2]) + (kb / 8) * NB + 16 * j), i8f(s[1] + kb * NB + 16 * j));
    else a = ph16(h16(s[1]) + kb * NB + 16 * j);
  }
};

}  // namespace vnni
