"""In-kernel pieces shared by the forward and backward Triton kernels: block loads, OFA's relative buckets
computed from position ids (the rules of relpos.py), the bias gathered from the per-layer tables, the causal /
padding / length mask, and a key block's logits (`key_block`, the one definition both directions use).

The tables arrive transposed, (H, num_buckets) contiguous, so one head's row is contiguous and a
gather is a pointer offset (no per-element multiply).
"""
import triton
import triton.language as tl

KIND_TEXT = tl.constexpr(1)
KIND_IMAGE = tl.constexpr(2)


@triton.jit
def load_rows(X, b, h, s_b, s_h, s_t, offs, T, offs_w, W, DOT_T: tl.constexpr):
    """Rows `offs` of sample b, head h of a (B, H, T, W) strided tensor, columns `offs_w`, as DOT_T; 0 past T, W."""
    return tl.load(X + b * s_b + h * s_h + offs[:, None] * s_t + offs_w[None, :],
                   mask=(offs < T)[:, None] & (offs_w < W)[None, :], other=0.0).to(DOT_T)


@triton.jit
def load_tokens(KIND, POS, KPM, b, offs, T, HAS_REL: tl.constexpr, HAS_KPM: tl.constexpr):
    """Kind, position and padding flag of a block of tokens; past the end: kind 0 (no gather), padded."""
    kind, pos, pad = offs * 0, offs * 0, offs * 0
    if HAS_REL:
        kind = tl.load(KIND + b * T + offs, mask=offs < T, other=0)
        pos = tl.load(POS + b * T + offs, mask=offs < T, other=0)
    if HAS_KPM:
        pad = tl.load(KPM + b * T + offs, mask=offs < T, other=1)
    return kind, pos, pad


@triton.jit
def rel_buckets(q_kind, q_pos, k_kind, k_pos, LUT, MAX_POS: tl.constexpr, N: tl.constexpr,
                HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr):
    """(BM, BN) masks and table columns of the text x text and image x image pairs.

    text:  LUT[clamp(pos_q - pos_k) + MAX_POS - 1]                       (relpos.text_bucket_lut)
    image: (row_q - row_k + N - 1) * (2N - 1) + (col_q - col_k + N - 1) for ids 1 + row*N + col,
           with the id-0 slots last                                     (relpos.image_bucket)
    """
    zero = q_pos[:, None] * 0 + k_pos[None, :] * 0
    is_text, text_col, is_image, image_col = zero != 0, zero, zero != 0, zero
    if HAS_TEXT:
        is_text = (q_kind == KIND_TEXT)[:, None] & (k_kind == KIND_TEXT)[None, :]
        r = tl.minimum(tl.maximum(q_pos[:, None] - k_pos[None, :], 1 - MAX_POS), MAX_POS - 1)
        text_col = tl.load(LUT + (MAX_POS - 1) + r, mask=is_text, other=0)
    if HAS_IMAGE:
        is_image = (q_kind == KIND_IMAGE)[:, None] & (k_kind == KIND_IMAGE)[None, :]
        W: tl.constexpr = 2 * N - 1
        num: tl.constexpr = W * W + 3
        # row*W + col per token, so a pair is one subtraction. Id 0 is overridden below, so the
        # rounding of (0 - 1) // N does not matter.
        lin_q = ((q_pos - 1) // N) * W + (q_pos - 1) % N
        lin_k = ((k_pos - 1) // N) * W + (k_pos - 1) % N
        image_col = lin_q[:, None] - lin_k[None, :] + (N - 1) * (W + 1)
        q0, k0 = (q_pos == 0)[:, None], (k_pos == 0)[None, :]
        image_col = tl.where(k0, num - 2, image_col)
        image_col = tl.where(q0, num - 3, image_col)
        image_col = tl.where(q0 & k0, num - 1, image_col)
        image_col = tl.minimum(tl.maximum(image_col, 0), num - 1)
    return is_text, text_col, is_image, image_col


@triton.jit
def logits(qk, scale, offs_m, offs_n, TK, k_pad, is_text, text_col, is_image, image_col, TEXT_T, IMAGE_T,
           CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_IMAGE: tl.constexpr):
    """scale * q.k + relative bias (fp32), -inf where the key is padding, past the end or in the future.
    TEXT_T / IMAGE_T point at this head's table row."""
    s = qk * scale
    if HAS_TEXT:
        s += tl.load(TEXT_T + text_col, mask=is_text, other=0.0).to(tl.float32)
    if HAS_IMAGE:
        s += tl.load(IMAGE_T + image_col, mask=is_image, other=0.0).to(tl.float32)
    allowed = (offs_n < TK)[None, :]
    if HAS_KPM:
        allowed = allowed & (k_pad == 0)[None, :]
    if CAUSAL:
        allowed = allowed & (offs_m[:, None] >= offs_n[None, :])
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def key_block(q, q_kind, q_pos, offs_m, K, V, K_KIND, K_POS, KPM, b, h, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, offs_n,
              TK, offs_wqk, WQK, offs_wv, WV, LUT, TEXT_T, IMAGE_T, scale, MAX_POS: tl.constexpr,
              GRID_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_TEXT: tl.constexpr,
              HAS_IMAGE: tl.constexpr, DOT_T: tl.constexpr):
    """Key block `offs_n`: its k and v rows and the logits of the query block against it. The forward and the dQ
    backward both call this, so the backward recomputes exactly the logits the forward normalised."""
    k = load_rows(K, b, h, s_kb, s_kh, s_kt, offs_n, TK, offs_wqk, WQK, DOT_T)
    v = load_rows(V, b, h, s_vb, s_vh, s_vt, offs_n, TK, offs_wv, WV, DOT_T)
    k_kind, k_pos, k_pad = load_tokens(K_KIND, K_POS, KPM, b, offs_n, TK, HAS_TEXT or HAS_IMAGE, HAS_KPM)
    is_text, text_col, is_image, image_col = rel_buckets(q_kind, q_pos, k_kind, k_pos, LUT, MAX_POS, GRID_N,
                                                         HAS_TEXT, HAS_IMAGE)
    s = logits(tl.dot(q, tl.trans(k), input_precision="ieee"), scale, offs_m, offs_n, TK, k_pad,
               is_text, text_col, is_image, image_col, TEXT_T, IMAGE_T, CAUSAL, HAS_KPM, HAS_TEXT, HAS_IMAGE)
    return k, v, s
