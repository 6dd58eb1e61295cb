"""OFA attention with its position biases: the ofa-ds Triton kernel against the alternatives. JSON out.

    python benchmarks/attention.py --out benchmarks/results/attention.json [--batch B | --tokens N]
    python benchmarks/attention.py --sweep 27            # CPU: the full interpreter sweep

On a GPU, for OFA shapes (encoder [196 patches ; 128 text] and [256 ; 267] with padding, decoder
self-attention over 257 text or image-code targets, causal) and head dims 64 / 80 / 128 (q/k width twice
that: the absolute-position channels), bf16, forward and forward+backward: time, TFLOP/s and peak memory of
- `ofa_ds_triton`: fused_attention(backend="triton"), both relative tables gathered in the kernel;
- `sdpa_bias`: torch SDPA with the bias and masks materialised as one float tensor (backend="sdpa");
- `flex_score_mod`: FlexAttention (compiled) with the bias as a score_mod gathering from the same tables
  and the masks as a block mask;
- `flash_attn2_no_bias`: FlashAttention-2 at head dim d for q, k and v, no bias, no padding (the speed bar
  of DESIGN.md; it cannot take OFA's terms), where `flash_attn` is installed.
FLOPs are the nominal 2*B*H*Tq*Tk*(Wqk + Wv) of the forward (half when causal) and 3.5x that for
forward+backward (padding not discounted). An alternative that fails (not installed, out of memory,
unsupported) is recorded with its error; nothing falls back to anything else, and a failure of the
Triton kernel other than out-of-memory stops the run.

Without CUDA there are no timings (they are pending hardware). The script then says so and runs
- the correctness sweep of the Triton kernels in the Triton interpreter against float64, OFA shapes at
  small sizes, dtype x head dim x attention kind (`--sweep` cases; the default 9 has every dtype x head
  dim pair once, 27 is all);
- a forward check of the FlexAttention score_mod against the reference (so the GPU run compares like
  with like);
- the memory argument for OFA-Huge (H=16, head dim 80): bytes each path keeps for the backward per layer
  and per sample, measured with autograd saved-tensor hooks for the reference and SDPA paths at full size,
  and for the kernel computed (lse + out) and checked by the same measurement at a small size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import emit  # noqa: E402
from ofa_ds.kernels.attention import KIND_IMAGE, KIND_TEXT, RelPos, fused_attention  # noqa: E402
from ofa_ds.kernels.attention.relpos import num_image_buckets, num_text_buckets, text_bucket_lut  # noqa: E402

N = 42  # image position grid
HEADS = {64: 16, 80: 16, 128: 12}  # OFA-Large, OFA-Huge, ofa_1.5b
SHAPES = {  # name: (kind, image patches or decoder length, text length)
    "enc_196+128": ("encoder", 196, 128),
    "enc_256+267": ("encoder", 256, 267),
    "dec_text_257": ("decoder_text", 257, 0),
    "dec_code_257": ("decoder_code", 257, 0),
}


def ofa_problem(kind, a, b, *, B, H, d, dtype, device, seed=0):
    """One OFA self-attention: q, k (B, H, S, 2d), v (B, H, S, d), RelPos, key padding, causal."""
    g = torch.Generator().manual_seed(seed)
    if kind == "encoder":  # a sampled patches of a 24 x 24 grid, then b text tokens; odd samples 3/4 padded text
        ids = torch.stack([torch.randperm(576, generator=g)[:a] for _ in range(B)])
        kinds = torch.cat([torch.full((B, a), KIND_IMAGE), torch.full((B, b), KIND_TEXT)], 1)
        pos = torch.cat([1 + ids // 24 * N + ids % 24, torch.arange(b).expand(B, b)], 1)
        pad = torch.zeros(B, a + b, dtype=torch.bool)
        pad[1::2, a + 3 * b // 4 :] = True
        causal = False
    else:  # decoder: text positions, or OFA's image_position_idx (0 for BOS, 16 x 16 code grid, then 1024)
        code = torch.cat(
            [
                torch.zeros(1, dtype=torch.long),
                1 + torch.arange(256) // 16 * N + torch.arange(256) % 16,
                torch.full((1024,), 1024),
            ]
        )
        kinds = torch.full((B, a), KIND_IMAGE if kind == "decoder_code" else KIND_TEXT)
        pos = (code[:a] if kind == "decoder_code" else torch.arange(a)).expand(B, a)
        pad = torch.zeros(B, a, dtype=torch.bool)
        if kind == "decoder_text":
            pad[1::2, 3 * a // 4 :] = True
        causal = True
    S = kinds.shape[1]
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    q, k, v = rnd(B, H, S, 2 * d), rnd(B, H, S, 2 * d), rnd(B, H, S, d)
    kinds, pos = kinds.to(device, torch.int8), pos.to(device, torch.int32)
    rel = RelPos(
        kinds,
        pos,
        kinds,
        pos,
        rnd(num_text_buckets(256), H),
        rnd(num_image_buckets(N), H),
        text_bucket_lut(256, 1024, device),
        N,
    )
    return q, k, v, rel, pad.to(device), causal


def run_backend(backend):
    def f(q, k, v, rel, pad, causal):
        return fused_attention(
            q, k, v, scale=(q.shape[-1]) ** -0.5, causal=causal, key_padding_mask=pad, rel_pos=rel, backend=backend
        )

    return f


def flex_score_mod(rel):
    """OFA's relative bias as a FlexAttention score_mod reading the same tables (image buckets clamped as
    relpos.image_bucket; every branch is evaluated, so all indices are kept in range)."""
    M, num = rel.max_positions, num_image_buckets(N)
    qk, qp, kk, kp, lut = rel.q_kind, rel.q_pos, rel.k_kind, rel.k_pos, rel.text_lut
    tt, it = rel.text_table, rel.image_table

    def score_mod(score, b, h, i, j):
        pi, pj = qp[b, i], kp[b, j]
        text = tt[lut[(pi - pj).clamp(1 - M, M - 1) + M - 1], h]
        ri, ci, rj, cj = (pi - 1) // N, (pi - 1) % N, (pj - 1) // N, (pj - 1) % N
        ib = (ri - rj + N - 1) * (2 * N - 1) + ci - cj + N - 1
        ib = torch.where(pj == 0, num - 2, ib)
        ib = torch.where(pi == 0, num - 3, ib)
        ib = torch.where((pi == 0) & (pj == 0), num - 1, ib).clamp(0, num - 1)
        both = lambda kind: (qk[b, i] == kind) & (kk[b, j] == kind)  # noqa: E731
        bias = torch.where(both(KIND_TEXT), text, torch.where(both(KIND_IMAGE), it[ib, h], 0.0))
        return score + bias.to(score.dtype)

    return score_mod


def flex(compiled):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    fn = torch.compile(flex_attention) if compiled else flex_attention
    masks = {}  # a model builds the block mask once per batch for all layers: not timed per call

    def f(q, k, v, rel, pad, causal):
        B, _, S, _ = q.shape

        def mask_mod(b, h, i, j):
            return ~pad[b, j] & (i >= j) if causal else ~pad[b, j]

        if (id(pad), causal) not in masks:  # keeps `pad` alive, so its id is not reused
            masks[id(pad), causal] = pad, create_block_mask(mask_mod, B, None, S, S, device=q.device)
        return fn(
            q, k, v, score_mod=flex_score_mod(rel), block_mask=masks[id(pad), causal][1], scale=q.shape[-1] ** -0.5
        )

    return f


def flash2_no_bias(q, k, v, rel, pad, causal):
    from flash_attn import flash_attn_func

    d = v.shape[-1]
    tr = lambda t: t.transpose(1, 2)  # noqa: E731  (B, S, H, d)
    return tr(flash_attn_func(tr(q[..., :d]), tr(k[..., :d]), tr(v), causal=causal))


# ------------------------------------------------------------------------------------------ GPU


def gpu_bench(args, shapes=None, heads=None) -> list[dict]:
    """Rows for `shapes` (names of SHAPES; default all) x `heads` ((head dim, heads) pairs; default HEADS)."""
    impls = {
        "ofa_ds_triton": run_backend("triton"),
        "sdpa_bias": run_backend("sdpa"),
        "flex_score_mod": flex(True),
        "flash_attn2_no_bias": flash2_no_bias,
    }
    rows = []
    for shape in shapes or SHAPES:
        kind, a, b = SHAPES[shape]
        S = a + b
        B = args.batch or max(1, args.tokens // S)
        for d, H in heads or HEADS.items():
            q, k, v, rel, pad, causal = ofa_problem(kind, a, b, B=B, H=H, d=d, dtype=torch.bfloat16, device="cuda")
            for name, fn in impls.items():
                widths = (d, d) if name == "flash_attn2_no_bias" else (2 * d, d)
                fwd_flops = 2 * B * H * S * S * sum(widths) * (0.5 if causal else 1.0)
                for mode in ("fwd", "fwd_bwd"):
                    row = dict(shape=shape, head_dim=d, heads=H, batch=B, seq=S, causal=causal, impl=name, mode=mode)
                    try:
                        ms, peak = time_one(fn, (q, k, v, rel, pad, causal), backward=mode == "fwd_bwd")
                        flops = fwd_flops * (3.5 if mode == "fwd_bwd" else 1.0)
                        row.update(ms=ms, tflops=flops / ms / 1e9, peak_mb=peak / 2**20)
                    except Exception as e:  # recorded, never replaced by another implementation
                        if name == "ofa_ds_triton" and not isinstance(e, torch.cuda.OutOfMemoryError):
                            raise  # the kernel under test: any other failure stops the run
                        first_line = (str(e).splitlines() or [""])[0][:300]
                        row.update(error=f"{type(e).__name__}: {first_line}")
                        torch.cuda.empty_cache()
                    print(json.dumps(row), file=sys.stderr)
                    rows.append(row)
    return rows


def time_one(fn, inputs, backward):
    import triton.testing

    q, k, v, rel, pad, causal = inputs
    leaves = [q, k, v, rel.text_table, rel.image_table]
    for t in leaves:
        t.requires_grad_(backward)
    dout = torch.randn(v.shape[:2] + (q.shape[2], v.shape[3]), device=q.device, dtype=q.dtype)

    def step():
        if backward:
            fn(q, k, v, rel, pad, causal).backward(dout)
        else:
            with torch.no_grad():
                fn(q, k, v, rel, pad, causal)

    step()  # compile / autotune
    torch.cuda.synchronize()
    for t in leaves:
        t.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(step, warmup=10, rep=50, grad_to_none=leaves if backward else None)
    return ms, peak


# ------------------------------------------------------------------------------------------ CPU


SWEEP_SIZES = {"cpu": ((12, 21), (29, 0)), "cuda": ((196, 128), (257, 0))}  # (encoder, decoder) lengths (a, b)


def sweep(n: int, device: str = "cpu") -> list[dict]:
    """Triton kernels (the interpreter on CPU) vs float64 reference on `device`: max |err| / max(1, max |ref|) per
    tensor. CPU at small sizes; CUDA at OFA's lengths (so the kernels run several blocks)."""
    dtypes, kinds = (torch.float32, torch.float16, torch.bfloat16), ("encoder", "decoder_text", "decoder_code")
    # A Latin square per block of 9: every dtype x head dim pair, each pair of (dtype or dim) and kind once.
    cases = [
        (dtype, d, kinds[(i + j + shift) % 3])
        for shift in range(3)
        for i, dtype in enumerate(dtypes)
        for j, d in enumerate(HEADS)
    ]
    rows = []
    for i in range(n):
        dtype, d, kind = cases[i % len(cases)]
        a, b = SWEEP_SIZES[device][0 if kind == "encoder" else 1]
        q, k, v, rel, pad, causal = ofa_problem(kind, a, b, B=2, H=2, d=d, dtype=dtype, device=device, seed=i)
        dout = torch.randn(q.shape[:3] + (d,), generator=torch.Generator().manual_seed(i)).to(device, dtype)
        res = []
        for backend, cast in (("triton", lambda t: t), ("reference", lambda t: t.double())):
            leaves = [cast(t).detach().requires_grad_() for t in (q, k, v, rel.text_table, rel.image_table)]
            out = run_backend(backend)(*leaves[:3], rel.with_tables(*leaves[3:]), pad, causal)
            res.append([out, *torch.autograd.grad(out, leaves, cast(dout))])
        errs = {
            name: (a.double() - b).abs().max().item() / max(1.0, b.abs().max().item())
            for name, a, b in zip(("out", "dq", "dk", "dv", "d_text_table", "d_image_table"), *res)
        }
        rows.append(dict(dtype=str(dtype), head_dim=d, kind=kind, seq=a + b, rel_err=errs))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def flex_check(device: str = "cpu") -> dict:
    errs = {}
    for kind in ("encoder", "decoder_code"):
        a, b = (12, 21) if kind == "encoder" else (29, 0)
        q, k, v, rel, pad, causal = ofa_problem(kind, a, b, B=2, H=2, d=64, dtype=torch.float32, device=device)
        got = flex(compiled=False)(q, k, v, rel, pad, causal)
        want = run_backend("reference")(q, k, v, rel, pad, causal)
        errs[kind] = (got - want).abs().max().item()
        if errs[kind] > 1e-4:
            raise AssertionError(f"FlexAttention score_mod differs from the reference on {kind}: {errs[kind]:.3g}")
    return dict(max_abs_err=errs, note="forward, fp32, eager flex_attention (CPU has no flex backward)", device=device)


def saved_bytes(fn, inputs) -> int:
    """Bytes of the tensors one call keeps for its backward, beyond q, k, v and the tables."""
    q, k, v, rel, pad, causal = inputs
    leaves = [q, k, v, rel.text_table, rel.image_table]
    skip = {t.untyped_storage().data_ptr() for t in leaves}
    held = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            held[st.data_ptr()] = st.nbytes()
        return t

    for t in leaves:
        t.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(q, k, v, rel, pad, causal)
    return sum(held.values())


def memory_argument() -> dict:
    """OFA-Huge (H=16, head dim 80, q/k width 160), bf16, one sample, one layer."""
    H, d, dtype = HEADS[80], 80, torch.bfloat16
    out = {"model": "OFA-Huge: 16 heads, head dim 80, q/k width 160, bf16; per layer, per sample (linear in batch)"}
    for shape, (kind, a, b) in SHAPES.items():
        if shape == "dec_code_257":
            continue
        S = a + b
        problem = ofa_problem(kind, a, b, B=1, H=H, d=d, dtype=dtype, device="cpu")
        row = dict(seq=S, materialised_bias_bytes=H * S * S * 2)
        for backend in ("reference", "sdpa"):
            row[f"{backend}_saved_bytes_measured"] = saved_bytes(run_backend(backend), problem)
        row["triton_lse_bytes_computed"] = H * S * 4  # the kernel's only state beyond its inputs and output
        row["triton_saved_bytes_computed"] = H * S * 4 + H * S * d * 2  # lse fp32 + out
        row["reference_over_triton"] = round(
            row["reference_saved_bytes_measured"] / row["triton_saved_bytes_computed"], 1
        )
        out[shape] = row
    # The kernel's formula checked by measurement (interpreter forward, small size).
    S, h = 40, 2
    small = ofa_problem("decoder_text", S, 0, B=1, H=h, d=d, dtype=dtype, device="cpu")
    measured, computed = saved_bytes(run_backend("triton"), small), h * S * 4 + h * S * d * 2
    if measured != computed:
        raise AssertionError(f"triton saved {measured} bytes, formula says {computed}")
    out["triton_formula_check"] = dict(seq=S, heads=h, measured=measured, computed=computed)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="JSON file (default: stdout)")
    ap.add_argument("--batch", type=int, default=0, help="GPU batch size (default: --tokens // seq)")
    ap.add_argument("--tokens", type=int, default=65536, help="GPU tokens per batch when --batch is not given")
    ap.add_argument("--sweep", type=int, default=9, help="CPU: interpreter correctness cases (27 = all)")
    args = ap.parse_args()
    if torch.cuda.is_available():
        result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=gpu_bench(args))
    else:
        note = (
            "no CUDA device: no timings (pending hardware); ran the Triton interpreter correctness sweep, "
            "the FlexAttention score_mod check and the memory argument only"
        )
        print(note, file=sys.stderr)
        result = dict(
            device="cpu", note=note, sweep=sweep(args.sweep), flex_check=flex_check(), memory=memory_argument()
        )
    emit(result, args.out)


if __name__ == "__main__":
    main()
