"""Forward kernel: FlashAttention-2 online softmax over key blocks, fp32 statistics and accumulator,
OFA's relative bias gathered in place. One program per (query block, batch x head).

Writes out (B, H, TQ, WV) contiguous (WQK, WV: the q/k and v widths, padded to powers of two WQK_P,
WV_P in registers) and lse (B*H, TQ) fp32, each row's log-sum-exp (+inf for a row with no allowed
key, so the backward recomputes probabilities of exactly 0 there). DOT_T is the dtype of the dot
operands: the input dtype, or fp32 for fp32 inputs and in the interpreter (whose bf16 dot is wrong);
probabilities are rounded to the input dtype before P @ V either way, as on the GPU.
"""
import triton
import triton.language as tl

from .triton_bias import key_block, load_rows, load_tokens


@triton.jit
def attn_fwd(Q, K, V, O, LSE, KPM, Q_KIND, Q_POS, K_KIND, K_POS, TEXT_T, IMAGE_T, LUT,
             s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
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
    q = load_rows(Q, b, h, s_qb, s_qh, s_qt, offs_m, TQ, offs_wqk, WQK, DOT_T)  # (BM, WQK_P)
    q_kind, q_pos, _ = load_tokens(Q_KIND, Q_POS, KPM, b, offs_m, TQ, HAS_TEXT or HAS_IMAGE, False)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row max
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running row sum of exp(s - m_i)
    acc = tl.zeros((BLOCK_M, WV_P), tl.float32)
    hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M) if CAUSAL else TK
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, s = key_block(q, q_kind, q_pos, offs_m, K, V, K_KIND, K_POS, KPM, b, h, s_kb, s_kh, s_kt, s_vb, s_vh,
                            s_vt, offs_n, TK, offs_wqk, WQK, offs_wv, WV, LUT, text_t, image_t, scale, MAX_POS,
                            GRID_N, CAUSAL, HAS_KPM, HAS_TEXT, HAS_IMAGE, DOT_T)  # (BN, WQK_P), (BN, WV_P), (BM, BN)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet: exp(-inf) = 0
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(Q.dtype.element_ty).to(DOT_T), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    dead = l_i == 0.0  # every key masked: output 0, never 0/0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    tl.store(O + (bh * TQ + offs_m[:, None]).to(tl.int64) * WV + offs_wv[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m < TQ)[:, None] & (offs_wv < WV)[None, :])
    lse = tl.where(dead, float("inf"), m_i + tl.log(tl.where(dead, 1.0, l_i)))
    tl.store(LSE + bh * TQ + offs_m, lse, mask=offs_m < TQ)
