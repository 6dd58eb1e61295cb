"""In-kernel pieces shared by the forward and backward Triton kernels: block loads, OFA's relative buckets
computed from position ids (the rules of relpos.py), the bias gathered from the per-layer tables, the causal /
padding / length mask, and a key block's logits (`key_block`, the one definition both directions use).

Widths: a head dim D (64, 80, 128) is handled as a power-of-two main piece D0 and a tail D1 (0 or 16; 80 =
64 + 16), each its own dot, so no register tile is padded to the next power of two. q and k rows carry, after
their D head channels, D absolute-position channels (OFA's untied term) that live either in the same tensor
(`[q, pos_q]` concatenated) or in a tensor of their own shared by a layer stack: the kernels read them through
a second pointer either way, as two more pieces, and q.k is the sum of the pieces' dots (same tensor-core work
as one dot over the concatenation; every load exact-width, so pipelining buffers no padding). `rows` arguments
are (BLOCK, 1) pointers to the first element of each row.

The tables arrive transposed, (H, num_buckets) contiguous, so one head's row is contiguous and a
gather is a pointer offset (no per-element multiply).
"""

import triton
import triton.language as tl

KIND_TEXT = tl.constexpr(1)
KIND_IMAGE = tl.constexpr(2)


@triton.jit
def store_cols(rows, C0: tl.constexpr, W: tl.constexpr, ok, val):
    """Columns C0 .. C0+W-1 of a block of rows, in rows that are `ok` ((BLOCK, 1))."""
    tl.store(rows + (C0 + tl.arange(0, W))[None, :], val, mask=ok)


# The loads below are written out rather than calling a shared column loader: the Triton interpreter pays about a
# millisecond per nested jit call, and these run once per block.
@triton.jit
def load_pieces(rows, ok, D0: tl.constexpr, D1: tl.constexpr, DOT_T: tl.constexpr):
    """Rows of head-dim width as (main, tail) tiles in DOT_T, 0 in rows that are not `ok`. Without a tail
    (D1 = 0) the tail is the main tile again, never read (so callers need no branches of their own)."""
    x0 = tl.load(rows + tl.arange(0, D0)[None, :], mask=ok, other=0.0).to(DOT_T)
    x1 = x0
    if D1 > 0:
        x1 = tl.load(rows + (D0 + tl.arange(0, D1))[None, :], mask=ok, other=0.0).to(DOT_T)
    return x0, x1


@triton.jit
def load_qk(rows, pos_rows, ok, D0: tl.constexpr, D1: tl.constexpr, HAS_POS: tl.constexpr, DOT_T: tl.constexpr):
    """q or k rows as four tiles: head channels (main, tail), position channels (main, tail). Absent pieces
    are the main tile again, never read. Each tile is one exact-width load (one pipelined buffer each)."""
    c0, c1 = tl.arange(0, D0)[None, :], D0 + tl.arange(0, D1 if D1 > 0 else 1)[None, :]
    h0 = tl.load(rows + c0, mask=ok, other=0.0).to(DOT_T)
    h1, p0, p1 = h0, h0, h0
    if D1 > 0:
        h1 = tl.load(rows + c1, mask=ok, other=0.0).to(DOT_T)
    if HAS_POS:
        p0 = tl.load(pos_rows + c0, mask=ok, other=0.0).to(DOT_T)
        p1 = p0
        if D1 > 0:
            p1 = tl.load(pos_rows + c1, mask=ok, other=0.0).to(DOT_T)
    return h0, h1, p0, p1


@triton.jit
def dot_nt(a0, a1, a2, a3, b0, b1, b2, b3, D1: tl.constexpr, HAS_POS: tl.constexpr):
    """sum over the present pieces of a_i @ b_i^T, fp32 (q.k over head and position channels; dO.v with
    HAS_POS False)."""
    s = tl.dot(a0, tl.trans(b0), input_precision="ieee")
    if D1 > 0:
        s = tl.dot(a1, tl.trans(b1), s, input_precision="ieee")
    if HAS_POS:
        s = tl.dot(a2, tl.trans(b2), s, input_precision="ieee")
        if D1 > 0:
            s = tl.dot(a3, tl.trans(b3), s, input_precision="ieee")
    return s


@triton.jit
def dot_acc(a, b0, b1, b2, b3, c0, c1, c2, c3, D1: tl.constexpr, HAS_POS: tl.constexpr):
    """c_i += a @ b_i for the present pieces (absent accumulators come back unchanged)."""
    c0 = tl.dot(a, b0, c0, input_precision="ieee")
    if D1 > 0:
        c1 = tl.dot(a, b1, c1, input_precision="ieee")
    if HAS_POS:
        c2 = tl.dot(a, b2, c2, input_precision="ieee")
        if D1 > 0:
            c3 = tl.dot(a, b3, c3, input_precision="ieee")
    return c0, c1, c2, c3


@triton.jit
def zeros_like_pieces(x0, x1, D1: tl.constexpr):
    """fp32 accumulators shaped like (main, tail); without a tail both are the main one."""
    c0 = tl.zeros(x0.shape, tl.float32)
    c1 = c0
    if D1 > 0:
        c1 = tl.zeros(x1.shape, tl.float32)
    return c0, c1


@triton.jit
def store_qk(rows, pos_rows, ok, D0: tl.constexpr, D1: tl.constexpr, HAS_POS: tl.constexpr, g0, g1, g2, g3):
    """The inverse of load_qk, for the q and k gradients (already in the output dtype)."""
    c0, c1 = tl.arange(0, D0)[None, :], D0 + tl.arange(0, D1 if D1 > 0 else 1)[None, :]
    tl.store(rows + c0, g0, mask=ok)
    if D1 > 0:
        tl.store(rows + c1, g1, mask=ok)
    if HAS_POS:
        tl.store(pos_rows + c0, g2, mask=ok)
        if D1 > 0:
            tl.store(pos_rows + c1, g3, mask=ok)


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
def rel_buckets(
    q_kind,
    q_pos,
    k_kind,
    k_pos,
    LUT,
    MAX_POS: tl.constexpr,
    N: tl.constexpr,
    HAS_TEXT: tl.constexpr,
    HAS_IMAGE: tl.constexpr,
):
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
def logits(
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
    TEXT_T,
    IMAGE_T,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_TEXT: tl.constexpr,
    HAS_IMAGE: tl.constexpr,
):
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
def key_block(
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
    TEXT_T,
    IMAGE_T,
    scale,
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
):
    """Key block `offs_n`: its k pieces (load_qk), v pieces and the logits of the query block against it. The
    forward and the dQ backward both call this, so the backward recomputes exactly the logits the forward
    normalised. K, PK, V point at this sample's and head's rows."""
    ok = (offs_n < TK)[:, None]
    k0, k1, k2, k3 = load_qk(K + offs_n[:, None] * s_kt, PK + offs_n[:, None] * s_pkt, ok, D0, D1, HAS_POS, DOT_T)
    v0, v1 = load_pieces(V + offs_n[:, None] * s_vt, ok, D0, D1, DOT_T)
    k_kind, k_pos, k_pad = load_tokens(K_KIND, K_POS, KPM, b, offs_n, TK, HAS_TEXT or HAS_IMAGE, HAS_KPM)
    is_text, text_col, is_image, image_col = rel_buckets(
        q_kind, q_pos, k_kind, k_pos, LUT, MAX_POS, GRID_N, HAS_TEXT, HAS_IMAGE
    )
    s = logits(
        dot_nt(q0, q1, q2, q3, k0, k1, k2, k3, D1, HAS_POS),
        scale,
        offs_m,
        offs_n,
        TK,
        k_pad,
        is_text,
        text_col,
        is_image,
        image_col,
        TEXT_T,
        IMAGE_T,
        CAUSAL,
        HAS_KPM,
        HAS_TEXT,
        HAS_IMAGE,
    )
    return k0, k1, k2, k3, v0, v1, s
