"""Contrastive losses against independent references: hand-computed cases, naive loops,
open_clip's own ClipLoss / SigLipLoss, and the plain losses for their tiled versions."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss


from align.losses import HardNegativeInfoNCE, InfoNCE, InfoNCETiled, SigLIP, SigLIPTiled
from align.losses.tiled import tiled_logsumexp
from align.registry import LOSSES
from tests.conftest import (EPS32, infonce_error, infonce_grad_error, logit_error, siglip_error,
                            siglip_grad_error)

SCALE = 1 / 0.07


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def paired(batch, dim, seed=0, noise=0.7):
    """(a, b) unit rows where b_i is a noisy copy of a_i (so positives are likelier)."""
    a = unit(batch, dim, seed=seed)
    b = F.normalize(a + noise * unit(batch, dim, seed=seed + 1), dim=-1)
    return a, b


def batch_extras(batch, dim, seed=0, k=3):
    g = torch.Generator().manual_seed(seed + 7)
    valid = torch.rand(batch, generator=g) > 0.25
    groups = torch.randint(-1, max(batch // 3, 2), (batch,), generator=g)
    negatives = unit(batch, k, dim, seed=seed + 9)
    negatives_mask = torch.rand(batch, k, generator=g) > 0.3
    return valid, groups, negatives, negatives_mask


def run(loss, a, b, scale=SCALE, **kwargs):
    """Forward + backward; returns (outputs, grad_a, grad_b, grad_scale)."""
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    s = torch.tensor(float(scale), requires_grad=True)
    out = loss(a, b, logit_scale=s, **kwargs)
    out["loss"].backward()
    return out, a.grad, b.grad, s.grad


def rel(x, y):
    return float((x - y).abs().max() / y.abs().max().clamp(min=1e-12))


def max_error(x, y):
    return float((x.detach().double() - y.detach().double()).abs().max())


def scale64(value=SCALE):
    return torch.tensor(float(value), dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_runs_forward_and_backward(name):
    a, b = paired(20, 8)
    valid, groups, negatives, negatives_mask = batch_extras(20, 8)
    a, b = a * valid[:, None], b * valid[:, None]  # invalid rows are zeros
    loss = LOSSES.get(name)()
    out, grad_a, grad_b, grad_s = run(loss, a, b, valid=valid, groups=groups,
                                      negatives=negatives, negatives_mask=negatives_mask)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert all(torch.isfinite(v).all() for v in out.values())
    assert torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all()
    assert grad_a[~valid].abs().max() == 0 and grad_b[~valid].abs().max() == 0
    assert grad_a[valid].abs().sum() > 0
    for p in loss.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def naive_infonce(a, b, scale, valid=None, groups=None, same_group="ignore", negatives=None, negatives_mask=None):
    """Loop-by-loop transcription of the InfoNCE definition (in float64): a 0-d tensor, with
    gradients when a, b or scale require them."""
    rows = [i for i in range(a.shape[0]) if valid is None or valid[i]]
    a, b = a.double(), b.double()
    total = torch.zeros((), dtype=torch.float64)
    for direction in ("a2b", "b2a"):
        q, c = (a, b) if direction == "a2b" else (b, a)
        loss = 0.0
        for i in rows:
            logits, positives = [], []
            for j in rows:
                same = groups is not None and groups[i] >= 0 and groups[i] == groups[j] and i != j
                if same and same_group == "ignore":
                    continue
                logits.append(scale * (q[i] @ c[j]))
                positives.append(i == j or same)
            if direction == "a2b" and negatives is not None:
                for k in range(negatives.shape[1]):
                    if negatives_mask[i, k]:
                        logits.append(scale * (q[i] @ negatives[i, k].double()))
                        positives.append(False)
            lse = torch.logsumexp(torch.stack(logits), dim=0)
            pos = [z for z, p in zip(logits, positives) if p]
            loss = loss + lse - sum(pos) / len(pos)
        total = total + loss / len(rows) / 2
    return total


@pytest.mark.parametrize("same_group", ["ignore", "positive"])
def test_infonce_matches_naive_reference(same_group):
    a, b = paired(12, 6)
    valid, groups, negatives, negatives_mask = batch_extras(12, 6, seed=3)
    out, *_ = run(InfoNCE(same_group=same_group), a, b, valid=valid, groups=groups,
                  negatives=negatives, negatives_mask=negatives_mask)
    expected = naive_infonce(a, b, SCALE, valid, groups, same_group, negatives, negatives_mask).item()
    # float32 loss against the float64 loop: 12 rows, 12 + 3 logits of unit vectors of size 6
    assert out["loss"].item() == pytest.approx(expected, abs=infonce_error(6, 15, 12, SCALE))


def test_infonce_matches_open_clip_cliploss():
    a, b = paired(64, 32, noise=2.0)
    ours, grad_a, grad_b, grad_s = run(InfoNCE(), a, b)
    ref_a, ref_b = a.double().requires_grad_(), b.double().requires_grad_()  # open_clip in float64
    s = scale64()
    ref = ClipLoss()(ref_a, ref_b, s)
    ref.backward()
    # our float32 against the float64 reference: 64 rows and logits of unit vectors of size 32
    assert ours["loss"].item() == pytest.approx(ref.item(), abs=infonce_error(32, 64, 64, SCALE))
    bound = infonce_grad_error(32, 64, 64, SCALE)
    assert max_error(grad_a, ref_a.grad) <= bound and max_error(grad_b, ref_b.grad) <= bound
    assert grad_s.item() == pytest.approx(s.grad.item(), abs=infonce_grad_error(32, 64, 64, SCALE, wrt_scale=True))


def test_infonce_two_by_two_by_hand():
    # cos(a0,b0)=1, cos(a0,b1)=0, cos(a1,b0)=0.6, cos(a1,b1)=0.8, scale 1
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out, *_ = run(InfoNCE(), a, b, scale=1.0)
    a2b = ((math.log(math.e ** 1 + math.e ** 0) - 1) + (math.log(math.e ** 0.6 + math.e ** 0.8) - 0.8)) / 2
    b2a = ((math.log(math.e ** 1 + math.e ** 0.6) - 1) + (math.log(math.e ** 0 + math.e ** 0.8) - 0.8)) / 2
    bound = infonce_error(2, 2, 2, 1.0)  # float32 against exact: 2 rows of 2 logits, scale 1
    assert out["a2b"].item() == pytest.approx(a2b, abs=bound)
    assert out["b2a"].item() == pytest.approx(b2a, abs=bound)
    assert out["loss"].item() == pytest.approx((a2b + b2a) / 2, abs=bound)


def test_siglip_matches_open_clip_sigliploss():
    a, b = paired(48, 16)
    loss = SigLIP(bias_init=-3.0)
    ours, grad_a, grad_b, grad_s = run(loss, a, b, scale=10.0)
    ref_a, ref_b = a.double().requires_grad_(), b.double().requires_grad_()  # open_clip in float64
    s = scale64(10.0)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    ref = SigLipLoss()(ref_a, ref_b, s, bias)
    ref.backward()
    # our float32 against the float64 reference: 48 x 48 pairs of unit vectors of size 16
    assert ours["loss"].item() == pytest.approx(ref.item(), abs=siglip_error(16, 48, 48, 10.0, -3.0, ref.item()))
    bound = siglip_grad_error(16, 48, 48, 10.0)
    assert max_error(grad_a, ref_a.grad) <= bound and max_error(grad_b, ref_b.grad) <= bound
    bound = siglip_grad_error(16, 48, 48, 10.0, wrt_scale=True)
    assert grad_s.item() == pytest.approx(s.grad.item(), abs=bound)
    assert loss.logit_bias.grad.item() == pytest.approx(bias.grad.item(), abs=bound)


@pytest.mark.parametrize("same_group", ["ignore", "positive"])
def test_hcl_without_reweighting_or_debiasing_is_infonce(same_group):
    a, b = paired(16, 8)
    valid, groups, negatives, negatives_mask = batch_extras(16, 8, seed=5)
    kwargs = dict(valid=valid, groups=groups, negatives=negatives, negatives_mask=negatives_mask)
    hcl, ga, gb, gs = run(HardNegativeInfoNCE(beta=0.0, tau_plus=0.0, same_group=same_group), a, b, **kwargs)
    ref_a, ref_b, s = a.double().requires_grad_(), b.double().requires_grad_(), scale64()
    ref = naive_infonce(ref_a, ref_b, s, same_group=same_group, **kwargs)  # float64, with gradients
    ref.backward()
    # HCL's float32 log-space path (logsumexp over the negatives, then logaddexp with the
    # positives' mass) rounds about twice as often as InfoNCE's single logsumexp: two bounds.
    # 16 rows, 16 + 3 logits of unit vectors of size 8.
    assert hcl["loss"].item() == pytest.approx(ref.item(), abs=2 * infonce_error(8, 19, 16, SCALE))
    bound = 2 * infonce_grad_error(8, 19, 16, SCALE)
    assert max_error(ga, ref_a.grad) <= bound and max_error(gb, ref_b.grad) <= bound
    assert gs.item() == pytest.approx(s.grad.item(), abs=2 * infonce_grad_error(8, 19, 16, SCALE, wrt_scale=True))


def test_hcl_matches_authors_formula():
    """Transcription of the HCL authors' criterion (estimator='hard') for one direction."""
    a, b = paired(10, 8, seed=2)
    beta, tau_plus, t = 1.0, 0.1, 0.5
    loss = HardNegativeInfoNCE(beta=beta, tau_plus=tau_plus)
    out, *_ = run(loss, a, b, scale=1 / t)
    expected = 0.0
    for q, c in ((a, b), (b, a)):
        sims = torch.exp(q.double() @ c.double().T / t)
        pos = sims.diag()
        neg = sims[~torch.eye(10, dtype=torch.bool)].view(10, 9)
        n = 9
        imp = (beta * neg.log()).exp()
        reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
        ng = (-tau_plus * n * pos + reweight_neg) / (1 - tau_plus)
        ng = torch.clamp(ng, min=n * math.e ** (-1 / t))
        expected += (-torch.log(pos / (pos + ng))).mean().item() / 2
    # float32 against float64: three logsumexps (negatives at (1 + beta) / t and at beta / t,
    # positives at 1 / t), each within an InfoNCE bound at the largest scale; debiasing removes
    # at most tau_plus of the mass, which scales the error by at most 1 / (1 - tau_plus).
    bound = 3 * infonce_error(8, 10, 10, (1 + beta) / t) / (1 - tau_plus)
    assert out["loss"].item() == pytest.approx(expected, abs=bound)


def test_vsepp_matches_hardest_negative_by_hand():
    a, b = paired(8, 4, seed=4)
    out, *_ = run(LOSSES.get("vsepp")(margin=0.2), a, b)
    sims = a.double() @ b.double().T
    off = sims.masked_fill(torch.eye(8, dtype=torch.bool), -10)
    a2b = (0.2 - sims.diag() + off.amax(1)).clamp(min=0).mean()
    b2a = (0.2 - sims.diag() + off.amax(0)).clamp(min=0).mean()
    # float32 against float64: each hinge holds two cosines of size-4 unit vectors (logit errors
    # at scale 1) and 3 roundings of values <= 2.2; the means over 8 rows and the sum add 10 more.
    bound = 2 * (2 * logit_error(4, 1.0) + 13 * 2.2 * EPS32)
    assert out["loss"].item() == pytest.approx((a2b + b2a).item(), abs=bound)
    combined, *_ = run(LOSSES.get("vsepp")(margin=0.2, infonce_weight=0.5), a, b)
    nce = naive_infonce(a, b, SCALE).item()
    bound += 0.5 * infonce_error(4, 8, 8, SCALE)
    assert combined["loss"].item() == pytest.approx((a2b + b2a).item() + 0.5 * nce, abs=bound)


def test_vsepp_explicit_negative_becomes_the_hardest():
    a, b = paired(6, 8, seed=4)
    near = F.normalize(a[:, None, :] + 0.05 * unit(6, 1, 8, seed=5), dim=-1)  # (B, 1, D) ~ a_i
    out, *_ = run(LOSSES.get("vsepp")(margin=0.2), a, b, negatives=near)
    sims = a.double() @ b.double().T
    off = sims.masked_fill(torch.eye(6, dtype=torch.bool), -10)
    hardest = torch.maximum(off.amax(1), (a.double() * near[:, 0].double()).sum(1))
    a2b = (0.2 - sims.diag() + hardest).clamp(min=0).mean()
    # float32 against float64: two cosines of size-8 unit vectors and 3 roundings per hinge, 6 rows
    assert out["a2b"].item() == pytest.approx(a2b.item(), abs=2 * logit_error(8, 1.0) + 9 * 2.2 * EPS32)


@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("rows", [0, 5])
def test_every_loss_is_a_connected_zero_without_valid_rows(name, rows):
    """A rank whose batch has no valid pair must still return a loss it can backward through."""
    a, b = torch.zeros(rows, 4), torch.zeros(rows, 4)
    out, grad_a, grad_b, _ = run(LOSSES.get(name)(), a, b, valid=torch.zeros(rows, dtype=torch.bool),
                                 groups=torch.full((rows,), -1), negatives=torch.zeros(rows, 2, 4))
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    assert grad_a.abs().sum() == 0 and grad_b.abs().sum() == 0


TILED_CASES = [
    dict(),
    dict(valid=True),
    dict(valid=True, groups=True),
    dict(valid=True, groups=True, negatives=True),
]


@pytest.mark.parametrize("same_group", ["ignore", "positive"])
@pytest.mark.parametrize("case", TILED_CASES, ids=lambda c: "+".join(c) or "plain")
@pytest.mark.parametrize("plain_cls,tiled_cls", [(InfoNCE, InfoNCETiled), (SigLIP, SigLIPTiled)],
                         ids=["infonce", "siglip"])
def test_tiled_equals_plain(plain_cls, tiled_cls, case, same_group):
    batch = 53  # not a multiple of the tile
    a, b = paired(batch, 16, seed=11)
    valid, groups, negatives, negatives_mask = batch_extras(batch, 16, seed=11)
    kwargs = {}
    if case.get("valid"):
        kwargs["valid"] = valid
    if case.get("groups"):
        kwargs["groups"] = groups
    if case.get("negatives"):
        kwargs.update(negatives=negatives, negatives_mask=negatives_mask)
    plain = plain_cls(same_group=same_group)
    tiled = tiled_cls(same_group=same_group, tile_size=16)
    ref, ra, rb, rs = run(plain, a, b, **kwargs)
    out, ga, gb, gs = run(tiled, a, b, **kwargs)
    # Both are float32 and each is within a rounding bound of the exact value, so they are within
    # twice that of each other. 53 rows, 53 + 3 logits of unit vectors of size 16; the tiled
    # logsumexp's 4 tiles add a rescale (exp and product) each, counted as 8 more logits.
    logits = batch + 3 + 8
    if plain_cls is InfoNCE:
        loss_bound = 2 * infonce_error(16, logits, batch, SCALE)
        grad_bound = 2 * infonce_grad_error(16, logits, batch, SCALE)
        scale_bound = 2 * infonce_grad_error(16, logits, batch, SCALE, wrt_scale=True)
    else:
        loss_bound = 2 * siglip_error(16, logits, batch, SCALE, -10.0, ref["loss"].item())
        grad_bound = 2 * siglip_grad_error(16, logits, batch, SCALE)
        scale_bound = 2 * siglip_grad_error(16, logits, batch, SCALE, wrt_scale=True)
    for key in ref:
        assert out[key].item() == pytest.approx(ref[key].item(), abs=loss_bound), key
    assert max_error(ga, ra) <= grad_bound and max_error(gb, rb) <= grad_bound
    assert gs.item() == pytest.approx(rs.item(), abs=scale_bound)
    if hasattr(plain, "logit_bias"):
        assert tiled.logit_bias.grad.item() == pytest.approx(plain.logit_bias.grad.item(), abs=scale_bound)


def test_tiled_logsumexp_exact_path_for_far_below_bound_rows():
    """Large logit scale and a row whose logits all lie far below the bound: the fast shared
    shift would underflow, the kernel must notice and stay exact."""
    q = unit(40, 8, seed=1)
    k = unit(40, 8, seed=2)
    k[:, 0] = k[:, 0].abs() + 1  # every key leans towards +e0 ...
    k = F.normalize(k, dim=-1)
    q[0] = -F.normalize(k.mean(0), dim=0)  # ... and query 0 points away from all of them
    q = q.requires_grad_()
    scale = torch.tensor(200.0)
    lse, _ = tiled_logsumexp(q, k, scale, torch.arange(40), tile=16)
    ref = torch.logsumexp(scale.double() * q.double() @ k.double().T, dim=1)  # float64
    # float32 against float64: a logit error at scale 200 (size-8 unit vectors), 40 + 3 + 6
    # roundings (exps, sum, log, 3 tile rescales) of O(1) values and 2 of |lse| <= 200 + log 40.
    bound = logit_error(8, 200.0) + (40 + 9 + 2 * (200 + math.log(40))) * EPS32
    assert max_error(lse, ref) <= bound
    (grad,) = torch.autograd.grad(lse.sum(), q)
    (ref_grad,) = torch.autograd.grad(ref.sum(), q)
    # d lse_i / d q_i = scale * sum_j p_ij k_j: softmax weights off by p_ij (2 logit errors + 49
    # roundings), the sum over 40 keys and the scaling add 42 roundings of values <= 1
    assert max_error(grad, ref_grad) <= 200.0 * (2 * logit_error(8, 200.0) + (49 + 42) * EPS32)


def test_same_group_ignore_removes_group_mates_from_the_denominator():
    # rows 0 and 1 share a group and near-identical b: without groups each is a hard negative
    # of the other; "ignore" drops them, "positive" makes them extra positives.
    a = torch.tensor([[1.0, 0.0], [0.995, 0.0998], [0.0, 1.0]])
    b = a.clone()
    groups = torch.tensor([5, 5, -1])
    plain, *_ = run(InfoNCE(), a, b, scale=4.0)
    ignored, *_ = run(InfoNCE(same_group="ignore"), a, b, scale=4.0, groups=groups)
    assert ignored["loss"].item() < plain["loss"].item() - 0.3
    z = 4.0 * (a @ b.T).double()
    # row 0 a2b with row 1 removed: log(e^z00 + e^z02) - z00
    z = z.tolist()
    row0 = math.log(math.exp(z[0][0]) + math.exp(z[0][2])) - z[0][0]
    row1 = math.log(math.exp(z[1][1]) + math.exp(z[1][2])) - z[1][1]
    row2 = math.log(sum(math.exp(v) for v in z[2])) - z[2][2]
    # float32 against float64: 3 rows of at most 3 logits of unit vectors of size 2, scale 4
    assert ignored["a2b"].item() == pytest.approx((row0 + row1 + row2) / 3, abs=infonce_error(2, 3, 3, 4.0))


def test_similar_explicit_negatives_raise_the_loss():
    a, b = paired(8, 16, seed=6)
    near = F.normalize(a[:, None, :] + 0.1 * unit(8, 1, 16, seed=8), dim=-1)  # (B, 1, D) close to a_i
    far = -near
    base, *_ = run(InfoNCE(), a, b)
    with_near, *_ = run(InfoNCE(), a, b, negatives=near)
    with_far, *_ = run(InfoNCE(), a, b, negatives=far)
    assert with_near["loss"].item() > base["loss"].item() + 0.5
    # a far negative (cosine ~ -1) adds about e^(-2 SCALE) ~ 4e-13 of the positive's mass: the
    # loss moves by that, far inside this bound (an in-batch negative moves it by ~0.1)
    assert with_far["loss"].item() == pytest.approx(base["loss"].item(), abs=1e-3)
    masked, *_ = run(InfoNCE(), a, b, negatives=near, negatives_mask=torch.zeros(8, 1, dtype=torch.bool))
    # the masked column changes the shape (and the kernels' summation order), not the value: two
    # float32 results, each within a bound of the exact loss (8 rows, 8 + 1 logits, size 16)
    assert masked["loss"].item() == pytest.approx(base["loss"].item(), abs=2 * infonce_error(16, 9, 8, SCALE))


def test_tiled_positive_mode_rejects_nothing_and_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="same_group"):
        InfoNCETiled(same_group="merge")


@pytest.mark.parametrize("tiled_cls,plain_cls", [(InfoNCETiled, InfoNCE), (SigLIPTiled, SigLIP)])
def test_tiled_takes_bf16_inputs_and_accumulates_in_fp32(tiled_cls, plain_cls):
    a, b = paired(40, 32, seed=12, noise=2.0)
    a, b = a.bfloat16(), b.bfloat16()
    out, ga, gb, _ = run(tiled_cls(tile_size=16), a, b)
    ref, ra, rb, _ = run(plain_cls(), a.float(), b.float())  # the same (rounded) inputs in fp32
    assert out["loss"].dtype == torch.float32 and ga.dtype == torch.bfloat16
    # on CPU the bf16 product is rounded once (|z| ~ 14 -> ~0.05); sums and exps stay fp32
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=2e-2)
    assert rel(ga.float(), ra) < 5e-2 and rel(gb.float(), rb) < 5e-2
