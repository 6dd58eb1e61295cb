"""Backward kernels (FlashAttention-2 style: probabilities recomputed from the saved lse, no S x S state).

attn_bwd_dq runs first, one program per query block: delta = rowsum(dO * O) (stored for the second
kernel) and dQ (with the position channels' part, DPQ). attn_bwd_dkdv, one program per key block: dK (DPK),
dV and the relative-table gradients. Widths and position channels as in triton_bias.py.

Table gradients: per-(head, bucket) sums of dS over every program, into one fp32 buffer DG per head
[text buckets | image buckets]. Adding each (query, key) element with its own atomic makes every program
hammer the same few hundred addresses, so with BLOCK_REDUCE each (BM, BN) block is reduced first
(add_table_grads): one atomic per bucket of each diagonal of the block, per element only for what remains.

Determinism: dQ, dK, dV are each written by exactly one program, so they are bit-reproducible. The
table gradients are accumulated with fp32 atomic adds; on a GPU their summation order varies, so they
reproduce only to fp32 rounding (the interpreter runs programs in order and is bit-reproducible).
"""

import triton
import triton.language as tl

from .triton_bias import (
    dot_acc,
    dot_nt,
    key_block,
    load_pieces,
    load_qk,
    load_tokens,
    logits,
    rel_buckets,
    store_cols,
    store_qk,
    zeros_like_pieces,
)


@triton.jit
def attn_bwd_dq(
    Q,
    PQ,
    K,
    PK,
    V,
    O,
    DO,
    DQ,
    DPQ,
    LSE,
    DELTA,
    KPM,
    Q_KIND,
    Q_POS,
    K_KIND,
    K_POS,
    TEXT_T,
    IMAGE_T,
    LUT,
    s_qb,
    s_qh,
    s_qt,
    s_pqb,
    s_pqh,
    s_pqt,
    s_kb,
    s_kh,
    s_kt,
    s_pkb,
    s_pkh,
    s_pkt,
    s_vb,
    s_vh,
    s_vt,
    s_dob,
    s_doh,
    s_dot,
    s_dq,
    H,
    TQ,
    TK,
    TEXT_ROWS,
    scale,
    T_BUCKET,
    MAX_POS: tl.constexpr,
    GRID_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_TEXT: tl.constexpr,
    HAS_IMAGE: tl.constexpr,
    HAS_POS: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    DOT_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    text_t = TEXT_T + h * TEXT_ROWS
    image_t = IMAGE_T + h * ((2 * GRID_N - 1) * (2 * GRID_N - 1) + 3)
    K, PK, V = K + b * s_kb + h * s_kh, PK + b * s_pkb + h * s_pkh, V + b * s_vb + h * s_vh  # this head's rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_q = offs_m < TQ
    ok_m = in_q[:, None]
    q0, q1, q2, q3 = load_qk(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt,
        PQ + b * s_pqb + h * s_pqh + offs_m[:, None] * s_pqt,
        ok_m,
        D0,
        D1,
        HAS_POS,
        DOT_T,
    )
    do0, do1 = load_pieces(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dot, ok_m, D0, D1, DOT_T)
    o0, o1 = load_pieces(O + (bh * TQ + offs_m[:, None]).to(tl.int64) * (D0 + D1), ok_m, D0, D1, tl.float32)
    delta = tl.sum(o0 * do0.to(tl.float32), 1)  # (BM,) = rowsum(P * dP)
    if D1 > 0:
        delta += tl.sum(o1 * do1.to(tl.float32), 1)
    tl.store(DELTA + bh * TQ + offs_m, delta, mask=in_q)
    lse = tl.load(LSE + bh * TQ + offs_m, mask=in_q, other=float("inf"))
    q_kind, q_pos, _ = load_tokens(Q_KIND, Q_POS, KPM, b, offs_m, TQ, HAS_TEXT or HAS_IMAGE, False)

    dq0, dq1 = zeros_like_pieces(q0, q1, D1)
    dq2, dq3 = dq0, dq1  # position channels' part; without them never updated or stored
    if HAS_POS:
        dq2, dq3 = zeros_like_pieces(q2, q3, D1)
    hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M) if CAUSAL else TK
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k0, k1, k2, k3, v0, v1, s = key_block(
            q0,
            q1,
            q2,
            q3,
            q_kind,
            q_pos,
            offs_m,
            K,
            s_kt,
            PK,
            s_pkt,
            V,
            s_vt,
            K_KIND,
            K_POS,
            KPM,
            b,
            offs_n,
            TK,
            LUT,
            text_t,
            image_t,
            scale,
            MAX_POS,
            GRID_N,
            CAUSAL,
            HAS_KPM,
            HAS_TEXT,
            HAS_IMAGE,
            HAS_POS,
            D0,
            D1,
            DOT_T,
        )  # s: (BM, BN)
        p = tl.exp(s - lse[:, None])  # (BM, BN)
        ds = p * (dot_nt(do0, do1, do0, do1, v0, v1, v0, v1, D1, False) - delta[:, None])  # d loss / d logits
        ds = ds.to(Q.dtype.element_ty).to(DOT_T)
        dq0, dq1, dq2, dq3 = dot_acc(ds, k0, k1, k2, k3, dq0, dq1, dq2, dq3, D1, HAS_POS)
    rows = (bh * TQ + offs_m[:, None]).to(tl.int64) * s_dq
    ty = DQ.dtype.element_ty
    store_qk(
        DQ + rows,
        DPQ + rows,
        ok_m,
        D0,
        D1,
        HAS_POS,
        (dq0 * scale).to(ty),
        (dq1 * scale).to(ty),
        (dq2 * scale).to(ty),
        (dq3 * scale).to(ty),
    )


@triton.jit
def add_table_grads(DG, col, ds, BM: tl.constexpr, BN: tl.constexpr):
    """DG[col] += ds over a (BM, BN) block (entries with col < 0 skipped), atomically, reduced first.

    A bucket is a function of the query and key positions, and OFA's positions mostly advance with the token
    index, so equal buckets lie along the block's diagonals: a text diagonal (consecutive positions) is one
    bucket, an image diagonal (raster patch ids) at most two, wherever the query and key rows wrap. The block is
    skewed by a gather so that column t holds the entries with i - j = t (mod BN), i.e. diagonal t (i >= j
    part) and diagonal t - BN (i < j part, when BM <= BN); in each part of each column the sums of the entries
    at its smallest and at its largest bucket go out with one atomic each, and only entries at a third bucket
    get atomics of their own. Exact for any positions (fp32 sums); fewer atomics the more regular they are.
    The gather's index has the source's shape (the well-supported case of tl.gather). Returns the number of
    atomic adds issued (for the tests; dead code in the kernel)."""
    i = tl.arange(0, BM)[:, None]
    t = tl.arange(0, BN)[None, :]
    j = (i - t + BN) % BN
    c = tl.gather(col, j, 1)
    g = tl.gather(ds, j, 1)
    rest = (c * 0) != 0  # all False: the entries left for per-entry atomics
    n = 0
    for part in tl.static_range(2):
        on = (c >= 0) & ((i >= t) if part == 0 else (i < t))
        lo = tl.min(tl.where(on, c, 2147483647), 0)
        hi = tl.max(tl.where(on, c, -1), 0)  # -1: an empty column part
        at_lo = on & (c == lo[None, :])
        at_hi = on & (c == hi[None, :]) & ~at_lo
        some, two = hi >= 0, hi > lo
        tl.atomic_add(DG + tl.where(some, lo, 0), tl.sum(tl.where(at_lo, g, 0.0), 0), mask=some, sem="relaxed")
        tl.atomic_add(DG + tl.where(two, hi, 0), tl.sum(tl.where(at_hi, g, 0.0), 0), mask=two, sem="relaxed")
        rest = rest | (on & ~at_lo & ~at_hi)
        n += tl.sum(some.to(tl.int32)) + tl.sum(two.to(tl.int32))
    n_rest = tl.sum(rest.to(tl.int32))
    if n_rest > 0:
        tl.atomic_add(DG + tl.where(rest, c, 0), g, mask=rest, sem="relaxed")
    return n + n_rest


@triton.jit
def attn_bwd_dkdv(
    Q,
    PQ,
    K,
    PK,
    V,
    DO,
    DK,
    DPK,
    DV,
    DG,
    LSE,
    DELTA,
    KPM,
    Q_KIND,
    Q_POS,
    K_KIND,
    K_POS,
    TEXT_T,
    IMAGE_T,
    LUT,
    s_qb,
    s_qh,
    s_qt,
    s_pqb,
    s_pqh,
    s_pqt,
    s_kb,
    s_kh,
    s_kt,
    s_pkb,
    s_pkh,
    s_pkt,
    s_vb,
    s_vh,
    s_vt,
    s_dob,
    s_doh,
    s_dot,
    s_dk,
    H,
    TQ,
    TK,
    TEXT_ROWS,
    scale,
    T_BUCKET,
    MAX_POS: tl.constexpr,
    GRID_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_TEXT: tl.constexpr,
    HAS_IMAGE: tl.constexpr,
    HAS_POS: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    DOT_T: tl.constexpr,
    BLOCK_REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    text_t = TEXT_T + h * TEXT_ROWS
    image_rows: tl.constexpr = (2 * GRID_N - 1) * (2 * GRID_N - 1) + 3
    image_t = IMAGE_T + h * image_rows
    dg = DG + h * (TEXT_ROWS + image_rows)  # this head's [text | image] gradient row
    Q, PQ, DO = Q + b * s_qb + h * s_qh, PQ + b * s_pqb + h * s_pqh, DO + b * s_dob + h * s_doh  # this head's rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_k = offs_n < TK
    ok_n = in_k[:, None]
    k0, k1, k2, k3 = load_qk(
        K + b * s_kb + h * s_kh + offs_n[:, None] * s_kt,
        PK + b * s_pkb + h * s_pkh + offs_n[:, None] * s_pkt,
        ok_n,
        D0,
        D1,
        HAS_POS,
        DOT_T,
    )
    v0, v1 = load_pieces(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vt, ok_n, D0, D1, DOT_T)
    k_kind, k_pos, k_pad = load_tokens(K_KIND, K_POS, KPM, b, offs_n, TK, HAS_TEXT or HAS_IMAGE, HAS_KPM)

    dk0, dk1 = zeros_like_pieces(k0, k1, D1)
    dk2, dk3 = dk0, dk1  # position channels' part; without them never updated or stored
    if HAS_POS:
        dk2, dk3 = zeros_like_pieces(k2, k3, D1)
    dv0, dv1 = zeros_like_pieces(v0, v1, D1)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0  # first query block that sees these keys
    for start_m in range(lo, TQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < TQ
        ok_m = in_q[:, None]
        q0, q1, q2, q3 = load_qk(Q + offs_m[:, None] * s_qt, PQ + offs_m[:, None] * s_pqt, ok_m, D0, D1, HAS_POS, DOT_T)
        do0, do1 = load_pieces(DO + offs_m[:, None] * s_dot, ok_m, D0, D1, DOT_T)
        lse = tl.load(LSE + bh * TQ + offs_m, mask=in_q, other=float("inf"))
        delta = tl.load(DELTA + bh * TQ + offs_m, mask=in_q, other=0.0)
        q_kind, q_pos, _ = load_tokens(Q_KIND, Q_POS, KPM, b, offs_m, TQ, HAS_TEXT or HAS_IMAGE, False)
        is_text, text_col, is_image, image_col = rel_buckets(
            q_kind, q_pos, k_kind, k_pos, LUT, MAX_POS, GRID_N, HAS_TEXT, HAS_IMAGE
        )
        qk = dot_nt(q0, q1, q2, q3, k0, k1, k2, k3, D1, HAS_POS)
        s = logits(
            qk,
            scale,
            offs_m,
            offs_n,
            TK,
            k_pad,
            is_text,
            text_col,
            is_image,
            image_col,
            text_t,
            image_t,
            CAUSAL,
            HAS_KPM,
            HAS_TEXT,
            HAS_IMAGE,
        )
        p = tl.exp(s - lse[:, None])  # (BM, BN)
        pt = tl.trans(p.to(Q.dtype.element_ty).to(DOT_T))
        dv0 = tl.dot(pt, do0, dv0, input_precision="ieee")
        if D1 > 0:
            dv1 = tl.dot(pt, do1, dv1, input_precision="ieee")
        ds = p * (dot_nt(do0, do1, do0, do1, v0, v1, v0, v1, D1, False) - delta[:, None])  # d loss / d logits
        dst = tl.trans(ds.to(Q.dtype.element_ty).to(DOT_T))
        dk0, dk1, dk2, dk3 = dot_acc(dst, q0, q1, q2, q3, dk0, dk1, dk2, dk3, D1, HAS_POS)
        if HAS_TEXT or HAS_IMAGE:
            # Each pair's row in dg, -1 for none; pairs with p = 0 (masked) have dS = 0 exactly and are skipped.
            col = text_col * 0 - 1
            if HAS_TEXT:
                col = tl.where(is_text, text_col, col)
            if HAS_IMAGE:
                col = tl.where(is_image, TEXT_ROWS + image_col, col)
            col = tl.where(p > 0.0, col, -1)
            if BLOCK_REDUCE:
                add_table_grads(dg, col, ds, BLOCK_M, BLOCK_N)
            else:
                tl.atomic_add(dg + tl.where(col >= 0, col, 0), ds, mask=col >= 0, sem="relaxed")
    rows = (bh * TK + offs_n[:, None]).to(tl.int64)
    ty = DK.dtype.element_ty
    store_qk(
        DK + rows * s_dk,
        DPK + rows * s_dk,
        ok_n,
        D0,
        D1,
        HAS_POS,
        (dk0 * scale).to(ty),
        (dk1 * scale).to(ty),
        (dk2 * scale).to(ty),
        (dk3 * scale).to(ty),
    )
    store_cols(DV + rows * (D0 + D1), 0, D0, ok_n, dv0.to(DV.dtype.element_ty))
    if D1 > 0:
        store_cols(DV + rows * (D0 + D1), D0, D1, ok_n, dv1.to(DV.dtype.element_ty))
