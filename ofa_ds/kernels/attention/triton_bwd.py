"""Backward kernels (FlashAttention-2 style: probabilities recomputed from the saved lse, no S x S state).

attn_bwd_dq runs first, one program per query block: delta = rowsum(dO * O) (stored for the second
kernel) and dQ. attn_bwd_dkdv, one program per key block: dK, dV and the relative-table gradients.

Determinism: dQ, dK, dV are each written by exactly one program, so they are bit-reproducible. The
table gradients are per-(head, bucket) sums of dS over every program, accumulated with fp32 atomic
adds; on a GPU their summation order varies, so they reproduce only to fp32 rounding (the
interpreter runs programs in order and is bit-reproducible).
"""
import triton
import triton.language as tl

from .triton_bias import key_block, load_rows, load_tokens, logits, rel_buckets


@triton.jit
def attn_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, KPM, Q_KIND, Q_POS, K_KIND, K_POS, TEXT_T, IMAGE_T, LUT,
                s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_dob, s_doh, s_dot,
                H, TQ, TK, WQK, WV, TEXT_ROWS, scale, T_BUCKET,
                MAX_POS: tl.constexpr, GRID_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr, WQK_P: tl.constexpr, WV_P: tl.constexpr,
                DOT_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    text_t = TEXT_T + h * TEXT_ROWS
    image_t = IMAGE_T + h * ((2 * GRID_N - 1) * (2 * GRID_N - 1) + 3)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_wqk, offs_wv = tl.arange(0, WQK_P), tl.arange(0, WV_P)
    in_q = offs_m < TQ
    q = load_rows(Q, b, h, s_qb, s_qh, s_qt, offs_m, TQ, offs_wqk, WQK, DOT_T)  # (BM, WQK_P)
    do = load_rows(DO, b, h, s_dob, s_doh, s_dot, offs_m, TQ, offs_wv, WV, DOT_T)  # (BM, WV_P)
    o = tl.load(O + (bh * TQ + offs_m[:, None]).to(tl.int64) * WV + offs_wv[None, :],
                mask=in_q[:, None] & (offs_wv < WV)[None, :], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BM,) = rowsum(P * dP)
    tl.store(DELTA + bh * TQ + offs_m, delta, mask=in_q)
    lse = tl.load(LSE + bh * TQ + offs_m, mask=in_q, other=float("inf"))
    q_kind, q_pos, _ = load_tokens(Q_KIND, Q_POS, KPM, b, offs_m, TQ, HAS_TEXT or HAS_IMAGE, False)

    dq = tl.zeros((BLOCK_M, WQK_P), tl.float32)
    hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M) if CAUSAL else TK
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, s = key_block(q, q_kind, q_pos, offs_m, K, V, K_KIND, K_POS, KPM, b, h, s_kb, s_kh, s_kt, s_vb, s_vh,
                            s_vt, offs_n, TK, offs_wqk, WQK, offs_wv, WV, LUT, text_t, image_t, scale, MAX_POS,
                            GRID_N, CAUSAL, HAS_KPM, HAS_TEXT, HAS_IMAGE, DOT_T)  # (BN, WQK_P), (BN, WV_P), (BM, BN)
        p = tl.exp(s - lse[:, None])  # (BM, BN)
        ds = p * (tl.dot(do, tl.trans(v), input_precision="ieee") - delta[:, None])  # d loss / d logits
        dq = tl.dot(ds.to(Q.dtype.element_ty).to(DOT_T), k, dq, input_precision="ieee")
    tl.store(DQ + (bh * TQ + offs_m[:, None]).to(tl.int64) * WQK + offs_wqk[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=in_q[:, None] & (offs_wqk < WQK)[None, :])


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, DK, DV, DTEXT, DIMAGE, LSE, DELTA, KPM, Q_KIND, Q_POS, K_KIND, K_POS,
                  TEXT_T, IMAGE_T, LUT,
                  s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_dob, s_doh, s_dot,
                  H, TQ, TK, WQK, WV, TEXT_ROWS, scale, T_BUCKET,
                  MAX_POS: tl.constexpr, GRID_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                  HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr, WQK_P: tl.constexpr, WV_P: tl.constexpr,
                  DOT_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    text_t, dtext = TEXT_T + h * TEXT_ROWS, DTEXT + h * TEXT_ROWS
    image_rows = (2 * GRID_N - 1) * (2 * GRID_N - 1) + 3
    image_t, dimage = IMAGE_T + h * image_rows, DIMAGE + h * image_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wqk, offs_wv = tl.arange(0, WQK_P), tl.arange(0, WV_P)
    in_k = offs_n < TK
    k = load_rows(K, b, h, s_kb, s_kh, s_kt, offs_n, TK, offs_wqk, WQK, DOT_T)  # (BN, WQK_P)
    v = load_rows(V, b, h, s_vb, s_vh, s_vt, offs_n, TK, offs_wv, WV, DOT_T)  # (BN, WV_P)
    k_kind, k_pos, k_pad = load_tokens(K_KIND, K_POS, KPM, b, offs_n, TK, HAS_TEXT or HAS_IMAGE, HAS_KPM)

    dk = tl.zeros((BLOCK_N, WQK_P), tl.float32)
    dv = tl.zeros((BLOCK_N, WV_P), tl.float32)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0  # first query block that sees these keys
    for start_m in range(lo, TQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < TQ
        q = load_rows(Q, b, h, s_qb, s_qh, s_qt, offs_m, TQ, offs_wqk, WQK, DOT_T)  # (BM, WQK_P)
        do = load_rows(DO, b, h, s_dob, s_doh, s_dot, offs_m, TQ, offs_wv, WV, DOT_T)  # (BM, WV_P)
        lse = tl.load(LSE + bh * TQ + offs_m, mask=in_q, other=float("inf"))
        delta = tl.load(DELTA + bh * TQ + offs_m, mask=in_q, other=0.0)
        q_kind, q_pos, _ = load_tokens(Q_KIND, Q_POS, KPM, b, offs_m, TQ, HAS_TEXT or HAS_IMAGE, False)
        is_text, text_col, is_image, image_col = rel_buckets(q_kind, q_pos, k_kind, k_pos, LUT, MAX_POS, GRID_N,
                                                             HAS_TEXT, HAS_IMAGE)
        s = logits(tl.dot(q, tl.trans(k), input_precision="ieee"), scale, offs_m, offs_n, TK, k_pad,
                   is_text, text_col, is_image, image_col, text_t, image_t, CAUSAL, HAS_KPM, HAS_TEXT, HAS_IMAGE)
        p = tl.exp(s - lse[:, None])  # (BM, BN)
        dv = tl.dot(tl.trans(p.to(Q.dtype.element_ty).to(DOT_T)), do, dv, input_precision="ieee")
        ds = p * (tl.dot(do, tl.trans(v), input_precision="ieee") - delta[:, None])  # d loss / d logits (= bias)
        dk = tl.dot(tl.trans(ds.to(Q.dtype.element_ty).to(DOT_T)), q, dk, input_precision="ieee")
        if HAS_TEXT:
            tl.atomic_add(dtext + text_col, ds, mask=is_text, sem="relaxed")
        if HAS_IMAGE:
            tl.atomic_add(dimage + image_col, ds, mask=is_image, sem="relaxed")
    out = (bh * TK + offs_n[:, None]).to(tl.int64)
    tl.store(DK + out * WQK + offs_wqk[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=in_k[:, None] & (offs_wqk < WQK)[None, :])
    tl.store(DV + out * WV + offs_wv[None, :], dv.to(DV.dtype.element_ty), mask=in_k[:, None] & (offs_wv < WV)[None, :])
