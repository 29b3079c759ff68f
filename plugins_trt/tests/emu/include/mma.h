/*
 * Emulated nvcuda::wmma (m16n16k16, fp16 / bf16 inputs, fp32 accumulator) for the CPU test of the sparse V kernels.
 * Found before CUDA's mma.h because emu_build.py puts this folder first on the include path.
 *
 * Every op is a warp collective (all 32 lanes, same op, same pointer / ldm: see emu_cuda.h). The pointer rules of
 * the CUDA programming guide are checked: 256-bit aligned pointers, ldm a multiple of 16 bytes. Operand fragments
 * hold the whole 16 x 16 tile in every lane; an accumulator lane holds only the 8 elements it owns in the sm_80 mma
 * layout (row = lane / 4 [+ 8], column = 2 * (lane % 4) [+ 1] [+ 8]) and NaN elsewhere, and store_matrix_sync writes
 * only those. So a kernel that reads the stored tile without a __syncwarp, or assumes which lane holds what, reads
 * NaN (shared memory starts as 0xFF bytes) instead of silently getting the right answer.
 */
#pragma once

#include "emu_cuda.h"

#include <limits>

namespace nvcuda
{
namespace wmma
{

struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;

enum layout_t
{
    mem_row_major,
    mem_col_major
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment;  // only the shapes below exist in the emulation

template <typename T>
struct fragment<matrix_a, 16, 16, 16, T, row_major>
{
    float x[256];  // [i * 16 + k]
};

template <typename T>
struct fragment<matrix_b, 16, 16, 16, T, col_major>
{
    float x[256];  // [k * 16 + j]
};

template <>
struct fragment<accumulator, 16, 16, 16, float, void>
{
    float x[256];  // [i * 16 + j], valid where ownerLane(i, j) == lane
};

//! Lane that holds accumulator element (i, j).
inline int ownerLane(int i, int j)
{
    return ((i & 7) << 2) | ((j & 7) >> 1);
}

inline float toF(__half v)
{
    return __half2float(v);
}
inline float toF(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}

inline void checkOperand(char const* op, void const* p, unsigned ldm, size_t elemBytes)
{
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    {
        ::rocket_emu::fail("%s: pointer %p is not 256-bit aligned", op, p);
    }
    if ((ldm * elemBytes) % 16 != 0)
    {
        ::rocket_emu::fail("%s: ldm %u (x %zu bytes) is not a multiple of 16 bytes", op, ldm, elemBytes);
    }
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float, void>& f, float v)
{
    int const lane = ::rocket_emu::current().lane;
    for (int e = 0; e < 256; ++e)
    {
        f.x[e] = ownerLane(e / 16, e % 16) == lane ? v : std::numeric_limits<float>::quiet_NaN();
    }
}

template <typename T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, T const* p, unsigned ldm)
{
    ::rocket_emu::warpArrive(::rocket_emu::Collective::kWmmaLoad, 0xffffffffu, 32, p);
    checkOperand("wmma::load_matrix_sync (a)", p, ldm, sizeof(T));
    for (int i = 0; i < 16; ++i)
        for (int k = 0; k < 16; ++k)
            f.x[i * 16 + k] = toF(p[static_cast<size_t>(i) * ldm + k]);
}

template <typename T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, T const* p, unsigned ldm)
{
    ::rocket_emu::warpArrive(::rocket_emu::Collective::kWmmaLoad, 0xffffffffu, 32, p);
    checkOperand("wmma::load_matrix_sync (b)", p, ldm, sizeof(T));
    for (int j = 0; j < 16; ++j)
        for (int k = 0; k < 16; ++k)
            f.x[k * 16 + j] = toF(p[static_cast<size_t>(j) * ldm + k]);
}

template <typename T>
void mma_sync(fragment<accumulator, 16, 16, 16, float, void>& d, fragment<matrix_a, 16, 16, 16, T, row_major> const& a,
    fragment<matrix_b, 16, 16, 16, T, col_major> const& b, fragment<accumulator, 16, 16, 16, float, void> const& c)
{
    ::rocket_emu::warpArrive(::rocket_emu::Collective::kWmmaMma, 0xffffffffu, 32);
    int const lane = ::rocket_emu::current().lane;
    float out[256];
    for (int e = 0; e < 256; ++e)
    {
        int const i = e / 16, j = e % 16;
        if (ownerLane(i, j) != lane)
        {
            out[e] = std::numeric_limits<float>::quiet_NaN();
            continue;
        }
        float s = c.x[e];
        for (int k = 0; k < 16; ++k)
        {
            s = std::fma(a.x[i * 16 + k], b.x[k * 16 + j], s);  // fp16 / bf16 products are exact in fp32
        }
        out[e] = s;
    }
    std::memcpy(d.x, out, sizeof(out));
}

inline void store_matrix_sync(
    float* p, fragment<accumulator, 16, 16, 16, float, void> const& f, unsigned ldm, layout_t layout)
{
    ::rocket_emu::warpArrive(::rocket_emu::Collective::kWmmaStore, 0xffffffffu, 32, p);
    checkOperand("wmma::store_matrix_sync", p, ldm, sizeof(float));
    int const lane = ::rocket_emu::current().lane;
    for (int e = 0; e < 256; ++e)
    {
        int const i = e / 16, j = e % 16;
        if (ownerLane(i, j) == lane)
        {
            p[layout == mem_row_major ? static_cast<size_t>(i) * ldm + j : static_cast<size_t>(j) * ldm + i] = f.x[e];
        }
    }
}

} // namespace wmma
} // namespace nvcuda
