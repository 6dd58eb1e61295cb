import math

import torch

from ofa_ds.train.loss import count_tokens, micro_loss, task_sums, token_nll

PAD, V = 1, 11


def stream(target, weights, tasks):
    return {"target": torch.tensor(target), "weights": torch.tensor(weights), "task_ids": torch.tensor(tasks)}


def logits_for(s, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*s["target"].shape, V, generator=g).requires_grad_()


def manual_sum(logits, s):
    """sum over non-pad tokens of -conf * log p(target), written out."""
    logits, total = logits.detach().double(), 0.0
    for b in range(s["target"].shape[0]):
        for t in range(s["target"].shape[1]):
            y = int(s["target"][b, t])
            if y != PAD:
                lp = logits[b, t] - torch.logsumexp(logits[b, t], 0)
                total = total - float(s["weights"][b]) * lp[y]
    return total


def test_token_nll_is_minus_log_prob_in_fp32_and_zero_at_pads():
    s = stream([[5, 2, PAD], [7, 7, 2]], [1.0, 1.0], [0, 0])
    logits = logits_for(s, 0).detach().to(torch.bfloat16)  # fp32 maths even for bf16 logits
    nll = token_nll(logits, s["target"], PAD)
    assert nll.dtype == torch.float32
    ref = -torch.log_softmax(logits.float(), -1).gather(-1, s["target"][..., None])[..., 0]
    assert torch.equal(nll[s["target"] != PAD], ref[s["target"] != PAD])
    assert nll[0, 2] == 0


def test_one_micro_batch_is_the_two_stream_token_mean():
    v1 = stream([[5, 2, PAD], [7, 8, 2]], [1.0, 0.6], [0, 2])
    v2 = stream([[3, 4, 4, 2], [9, 2, PAD, PAD]], [2.0, 2.0], [6, 8])
    lg = {"v1": logits_for(v1, 1), "v2": logits_for(v2, 2)}
    batch = {"v1": v1, "v2": v2}
    n = count_tokens(batch, PAD)
    assert n.tolist() == [5.0, 6.0]
    nll = {k: token_nll(lg[k], batch[k]["target"], PAD) for k in lg}
    loss, parts = micro_loss(nll, batch, n)
    loss = loss.detach()
    want1, want2 = manual_sum(lg["v1"], v1) / 5, manual_sum(lg["v2"], v2) / 6
    assert math.isclose(float(parts[0]), float(want1), rel_tol=1e-6)
    assert math.isclose(float(parts[1]), float(want2), rel_tol=1e-6)
    assert math.isclose(float(loss), float(want1 + want2), rel_tol=1e-6)


def test_shares_of_any_split_sum_to_the_global_loss_and_gradient():
    """Micro-batches (different padded lengths, v2 only in some) give the loss and gradient of the whole."""
    v1 = stream([[5, 2, PAD, PAD], [7, 8, 9, 2], [4, 2, PAD, PAD], [6, 6, 2, PAD]], [1.0, 0.5, 1.0, 0.9], [0, 2, 1, 3])
    v2 = stream([[3, 4, 2], [9, 2, PAD]], [2.0, 2.0], [6, 7])
    lg1, lg2 = logits_for(v1, 3), logits_for(v2, 4)
    whole = {"v1": v1, "v2": v2}
    nll = {"v1": token_nll(lg1, v1["target"], PAD), "v2": token_nll(lg2, v2["target"], PAD)}
    loss_whole, _ = micro_loss(nll, whole, count_tokens(whole, PAD))
    g_whole = torch.autograd.grad(loss_whole, [lg1, lg2])

    def part(s, rows, cols):
        return {k: v[rows][:, :cols] if k == "target" else v[rows] for k, v in s.items()}

    micro = [
        {"v1": part(v1, slice(0, 1), 2), "v2": part(v2, slice(0, 2), 3)},  # trimmed padding
        {"v1": part(v1, slice(1, 4), 4), "v2": None},
    ]
    logit_parts = [(lg1[0:1, :2], lg2), (lg1[1:4], None)]
    n = sum(count_tokens(b, PAD) for b in micro)
    assert n.tolist() == count_tokens(whole, PAD).tolist()
    total = 0
    for b, (l1, l2) in zip(micro, logit_parts):
        nll = {"v1": token_nll(l1, b["v1"]["target"], PAD)}
        if b["v2"] is not None:
            nll["v2"] = token_nll(l2, b["v2"]["target"], PAD)
        total = total + micro_loss(nll, b, n)[0]
    assert math.isclose(total.item(), loss_whole.item(), rel_tol=1e-6)
    for a, b in zip(torch.autograd.grad(total, [lg1, lg2]), g_whole):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_without_v2_the_loss_is_the_v1_token_mean():
    v1 = stream([[5, 2], [7, 2]], [1.0, 1.0], [0, 0])
    lg = logits_for(v1, 5)
    batch = {"v1": v1, "v2": None}
    loss, parts = micro_loss({"v1": token_nll(lg, v1["target"], PAD)}, batch, count_tokens(batch, PAD))
    assert parts[1] == 0
    assert math.isclose(loss.item(), manual_sum(lg, v1) / 4, rel_tol=1e-6)


def test_pad_targets_never_reach_the_loss():
    v1 = stream([[5, PAD], [PAD, 2]], [1.0, 1.0], [0, 0])
    lg = logits_for(v1, 6)
    batch = {"v1": v1}
    loss, _ = micro_loss({"v1": token_nll(lg, v1["target"], PAD)}, batch, count_tokens(batch, PAD))
    grad = torch.autograd.grad(loss, lg)[0]
    assert grad[0, 1].abs().sum() == 0 and grad[1, 0].abs().sum() == 0
    assert grad[0, 0].abs().sum() > 0


def test_task_sums_are_unweighted_per_task_nll_and_token_counts():
    s = stream([[5, 2, PAD], [7, 2, PAD], [4, 4, 2]], [2.0, 0.3, 1.0], [6, 2, 6])
    nll = token_nll(logits_for(s, 7), s["target"], PAD)
    out = task_sums(nll, s, 9, PAD)
    assert out[1].tolist() == [0, 0, 2, 0, 0, 0, 5, 0, 0]
    nll = nll.detach()
    assert math.isclose(float(out[0, 6]), float(nll[0, :2].sum() + nll[2].sum()), rel_tol=1e-6)
    assert math.isclose(float(out[0, 2]), float(nll[1, :2].sum()), rel_tol=1e-6)
