"""The numba kernel of gemv.py, a module of its own so that importing mmfuse does not import numba
(gemv.py imports it on first use) and so that its functions are module globals, which numba's disk
cache can key (functions closing over other jitted functions are compiled again in every process).

Each weight row is read once; four input rows share each weight element loaded (the four
accumulators of `dot4`); the rows after the last block of four run one at a time.
"""
import numba
import numpy as np

BLOCKS = 32  # a few blocks of output rows per core keeps the cores evenly loaded
u = np.uint64  # unsigned indices: numba then skips the negative-index wraparound that blocks vectorizing
SIXTEENTH = np.float32(0.0625)


@numba.njit(fastmath=True, cache=True)
def group_sums(x, g):  # (n, Kp) -> (n, G): the zero point's share of each group
    n, kp = x.shape
    out = np.zeros((n, kp // g), dtype=np.float32)
    for r in range(n):
        for t in range(kp // g):
            acc = np.float32(0.0)
            for i in range(g):
                acc += x[r, u(t * g + i)]
            out[r, t] = acc
    return out


@numba.njit(fastmath=True, cache=True, inline="always")
def dot1(w, j, k0, width, x, r):  # sum_i w[j, k0 + i] * x[r, k0 + i], i < width (fp32 or int8 w)
    acc = np.float32(0.0)
    for i in range(width):
        k = u(k0 + i)
        acc += np.float32(w[j, k]) * x[r, k]
    return acc


@numba.njit(fastmath=True, cache=True, inline="always")
def dot4(w, j, k0, width, x, r):  # dot1 for rows r..r+3, each weight element loaded once
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for i in range(width):
        k = u(k0 + i)
        wi = np.float32(w[j, k])
        a0 += wi * x[r, k]
        a1 += wi * x[r + 1, k]
        a2 += wi * x[r + 2, k]
        a3 += wi * x[r + 3, k]
    return a0, a1, a2, a3


@numba.njit(fastmath=True, cache=True, inline="always")
def nibble_dot1(q, j, t, g, x, r):  # group t of int4 row j: sum_i v[j, t*g + i] * x[r, t*g + i]
    h = g // 2
    d = e = np.float32(0.0)
    for i in range(h):
        v = np.uint8(q[j, u(t * h + i)])  # uint8 already: the cast types this for the other formats
        lo = np.float32(v & np.uint8(15))
        d += lo * x[r, u(t * g + i)]
        e += (np.float32(v) - lo) * x[r, u(t * g + h + i)]  # 16 * high nibble, without a (64-bit) shift
    return d + e * SIXTEENTH


@numba.njit(fastmath=True, cache=True, inline="always")
def nibble_dot4(q, j, t, g, x, r):  # nibble_dot1 for rows r..r+3, each byte unpacked once
    h = g // 2
    d0 = d1 = d2 = d3 = e0 = e1 = e2 = e3 = np.float32(0.0)
    for i in range(h):
        v = np.uint8(q[j, u(t * h + i)])
        lo = np.float32(v & np.uint8(15))
        hi = np.float32(v) - lo
        kl, kh = u(t * g + i), u(t * g + h + i)
        d0 += lo * x[r, kl]
        d1 += lo * x[r + 1, kl]
        d2 += lo * x[r + 2, kl]
        d3 += lo * x[r + 3, kl]
        e0 += hi * x[r, kh]
        e1 += hi * x[r + 1, kh]
        e2 += hi * x[r + 2, kh]
        e3 += hi * x[r + 3, kh]
    return d0 + e0 * SIXTEENTH, d1 + e1 * SIXTEENTH, d2 + e2 * SIXTEENTH, d3 + e3 * SIXTEENTH


@numba.njit(fastmath=True, cache=True, inline="always")
def row_dot1(w, s, z, zc, xs, j, x, r, g, bits):  # y[r, j]
    if bits == 32:
        return dot1(w, j, 0, x.shape[1], x, r)
    acc = np.float32(0.0)
    for t in range(x.shape[1] // g):
        d = dot1(w, j, t * g, g, x, r) if bits == 8 else nibble_dot1(w, j, t, g, x, r)
        zt = np.float32(z[j, t]) if z.shape[0] else zc
        acc += s[j, t] * (d - zt * xs[r, t])
    return acc


@numba.njit(fastmath=True, cache=True, inline="always")
def row_dot4(w, s, z, zc, xs, j, x, r, g, bits):  # y[r..r+3, j]
    if bits == 32:
        return dot4(w, j, 0, x.shape[1], x, r)
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for t in range(x.shape[1] // g):
        d0, d1, d2, d3 = dot4(w, j, t * g, g, x, r) if bits == 8 else nibble_dot4(w, j, t, g, x, r)
        zt = np.float32(z[j, t]) if z.shape[0] else zc
        st = s[j, t]
        a0 += st * (d0 - zt * xs[r, t])
        a1 += st * (d1 - zt * xs[r + 1, t])
        a2 += st * (d2 - zt * xs[r + 2, t])
        a3 += st * (d3 - zt * xs[r + 3, t])
    return a0, a1, a2, a3


@numba.njit(parallel=True, fastmath=True, cache=True)
def gemv_rows(w, s, z, zc, x, out, g, bits):  # out (n, N) = x (n, Kp) @ W.T
    n, n_out = out.shape
    zc = np.float32(zc)
    xs = group_sums(x, g)
    for b in numba.prange(BLOCKS):
        for j in range(b * n_out // BLOCKS, (b + 1) * n_out // BLOCKS):
            for r in range(0, n - 3, 4):
                out[r, j], out[r + 1, j], out[r + 2, j], out[r + 3, j] = row_dot4(w, s, z, zc, xs, j, x, r, g, bits)
            for r in range(n - n % 4, n):  # the rows after the last block, one at a time (the weight row is in L1)
                out[r, j] = row_dot1(w, s, z, zc, xs, j, x, r, g, bits)
