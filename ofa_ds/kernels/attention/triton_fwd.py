"""Forward kernel: FlashAttention-2 online softmax over key blocks, fp32 statistics and accumulator,
OFA's relative bias gathered in place. One program per (query block, batch x head).

Writes out (B, H, TQ, D) contiguous and lse (B*H, TQ) fp32, each row's log-sum-exp (+inf for a row with no
allowed key, so the backward recomputes probabilities of exactly 0 there). q, k are read as their D head
channels plus (HAS_POS) D position channels at PQ / PK, all strided, in main + tail pieces D0 + D1
(triton_bias.py). DOT_T is the dtype of the dot operands: the input dtype, or fp32 for fp32 inputs and in the
interpreter (whose bf16 dot is wrong); probabilities are rounded to the input dtype before P @ V either way,
as on the GPU.
"""

import triton
import triton.language as tl

from .triton_bias import key_block, load_qk, load_tokens, store_cols


@triton.jit
def attn_fwd(
    Q,
    PQ,
    K,
    PK,
    V,
    O,
    LSE,
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
    ok_m = (offs_m < TQ)[:, None]
    q0, q1, q2, q3 = load_qk(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt,
        PQ + b * s_pqb + h * s_pqh + offs_m[:, None] * s_pqt,
        ok_m,
        D0,
        D1,
        HAS_POS,
        DOT_T,
    )
    q_kind, q_pos, _ = load_tokens(Q_KIND, Q_POS, KPM, b, offs_m, TQ, HAS_TEXT or HAS_IMAGE, False)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row max
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running row sum of exp(s - m_i)
    acc0 = tl.zeros((BLOCK_M, D0), tl.float32)  # P @ V, main and tail columns
    acc1 = acc0
    if D1 > 0:
        acc1 = tl.zeros((BLOCK_M, D1), tl.float32)
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
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet: exp(-inf) = 0
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(Q.dtype.element_ty).to(DOT_T)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision="ieee")
        if D1 > 0:
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision="ieee")
        m_i = m_new

    dead = l_i == 0.0  # every key masked: output 0, never 0/0
    l_safe = tl.where(dead, 1.0, l_i)[:, None]
    o_rows = O + (bh * TQ + offs_m[:, None]).to(tl.int64) * (D0 + D1)
    store_cols(o_rows, 0, D0, ok_m, (acc0 / l_safe).to(O.dtype.element_ty))
    if D1 > 0:
        store_cols(o_rows, D0, D1, ok_m, (acc1 / l_safe).to(O.dtype.element_ty))
    lse = tl.where(dead, float("inf"), m_i + tl.log(tl.where(dead, 1.0, l_i)))
    tl.store(LSE + bh * TQ + offs_m, lse, mask=offs_m < TQ)
