"""Losses against float64 computations written from the equations (numpy/scipy), on fixed toy batches."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import log_softmax as np_log_softmax
from scipy.special import softmax as np_softmax
from scipy.stats import norm

from iqa_cli import losses

B, T, V = 4, 9, 23
LEVEL_IDS = [4, 7, 10, 13, 16]  # ascending quality
K = len(LEVEL_IDS)
EPS = 1e-8


def _toy_batch(seed: int = 0):
    """Logits [B, T, V], labels with responses of different lengths, the level token inside each."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.full((B, T), losses.IGNORE_INDEX, dtype=torch.long)
    # row b: response starts at `start`, level token at `level_at`, then "." and "</s>"
    spans = [(3, 5, 8), (2, 4, 7), (4, 6, 9), (3, 6, 8)]  # (start, level_at, end exclusive)
    levels = [1, 4, 0, 2]
    for b, (start, level_at, end) in enumerate(spans):
        labels[b, start:end] = torch.randint(17, V, (end - start,), generator=g)
        labels[b, level_at] = LEVEL_IDS[levels[b]]
    soft = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64) * 2, dim=-1)
    soft[2, 3:] = 0.0  # zeros in a soft label (0 log 0 = 0)
    soft[2] /= soft[2].sum()
    return logits, labels, soft


def _np_kl(logits_bv: np.ndarray, soft: np.ndarray) -> float:
    log_q = np_log_softmax(logits_bv, axis=-1)[:, LEVEL_IDS]
    terms = np.where(soft > 0, soft * (np.log(np.where(soft > 0, soft, 1.0)) - log_q), 0.0)
    return terms.sum() / logits_bv.shape[0]


def _np_ce(logits: np.ndarray, labels: np.ndarray, skip: set[tuple[int, int]]) -> float:
    """Token-mean CE over (b, t) with labels[b, t] supervised, predicted by logits[b, t - 1]."""
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] == losses.IGNORE_INDEX or (b, t) in skip:
                continue
            total -= np_log_softmax(logits[b, t - 1])[labels[b, t]]
            n += 1
    return total / n


def _np_fidelity(mu_a, s_a, mu_b, s_b, pmu_a, ps_a, pmu_b, ps_b) -> float:
    p = norm.cdf((mu_a - mu_b) / np.sqrt(s_a**2 + s_b**2 + EPS))
    if ps_a is None:
        p_hat = norm.cdf((pmu_a - pmu_b) / np.sqrt(2.0))
    else:
        p_hat = norm.cdf((pmu_a - pmu_b) / np.sqrt(ps_a**2 + ps_b**2 + EPS))
    return float(np.mean(1 - np.sqrt(p * p_hat + EPS) - np.sqrt((1 - p) * (1 - p_hat) + EPS)))


def _np_level_stats(logits_bv: np.ndarray, closed_set: bool = True):
    full = np_softmax(logits_bv, axis=-1)[:, LEVEL_IDS]
    probs = full / full.sum(-1, keepdims=True) if closed_set else full
    c = np.linspace(1.0, 5.0, K)
    mean = probs @ c
    std = np.sqrt((probs * (c[None] - mean[:, None]) ** 2).sum(-1))
    return probs, mean, std


# ---------------------------------------------------------------- KL, CE, level readout


def test_level_positions_finds_the_level_token_and_rejects_rows_without_one():
    _, labels, _ = _toy_batch()
    assert losses.level_positions(labels, LEVEL_IDS).tolist() == [5, 4, 6, 6]
    labels[1, 4] = 20
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        losses.level_positions(labels, LEVEL_IDS)


def test_soft_label_kl_equals_numpy_and_torch_kl_div_over_the_whole_vocabulary():
    logits, _, soft = _toy_batch()
    level_logits = logits[:, 2].float()
    got = losses.soft_label_kl(level_logits, LEVEL_IDS, soft.float())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_np_kl(level_logits.double().numpy(), soft.numpy()), rel=1e-5)
    # the reference's form: a full-vocabulary target, F.kl_div(log q, target, reduction="batchmean")
    target = torch.zeros(B, V, dtype=torch.float64)
    target[:, LEVEL_IDS] = soft
    ref = F.kl_div(torch.log_softmax(level_logits.double(), -1), target, reduction="batchmean")
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_soft_label_kl_is_zero_when_the_full_vocabulary_softmax_equals_the_soft_label():
    _, _, soft = _toy_batch()
    logits = torch.full((B, V), -1e4)
    logits[:, LEVEL_IDS] = torch.log(soft.clamp_min(1e-30)).float()
    assert losses.soft_label_kl(logits, LEVEL_IDS, soft.float()).item() == pytest.approx(0.0, abs=1e-6)
    # and is positive as soon as other tokens take some mass
    logits[:, 0] = 0.0
    assert losses.soft_label_kl(logits, LEVEL_IDS, soft.float()).item() > 1e-3


def test_response_cross_entropy_is_a_token_mean_without_the_level_token():
    logits, labels, _ = _toy_batch()
    pos = losses.level_positions(labels, LEVEL_IDS)
    exclude = torch.zeros_like(labels, dtype=torch.bool)
    exclude[torch.arange(B), pos] = True
    got = losses.response_cross_entropy(logits.float(), labels, exclude_mask=exclude)
    skip = {(b, int(pos[b])) for b in range(B)}
    assert got.item() == pytest.approx(_np_ce(logits.numpy(), labels.numpy(), skip), rel=1e-5)
    # every row has 4 supervised tokens besides the level; make row 0 shorter so that a token mean and a
    # mean of per-row means differ
    labels[0, 6:8] = losses.IGNORE_INDEX
    got = losses.response_cross_entropy(logits.float(), labels, exclude_mask=exclude)
    assert got.item() == pytest.approx(_np_ce(logits.numpy(), labels.numpy(), skip), rel=1e-5)


def test_response_cross_entropy_matches_the_reference_delete_then_shift():
    """The reference deletes the level label and the logit that predicts it, then shifts; same pairs."""
    logits, labels, _ = _toy_batch()
    pos = losses.level_positions(labels, LEVEL_IDS)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[torch.arange(B), pos] = False
    labels_del = labels[keep].view(B, T - 1)
    keep_logit = torch.ones(B, T, dtype=torch.bool)
    keep_logit[torch.arange(B), pos - 1] = False
    logits_del = logits[keep_logit].view(B, T - 1, V)
    ref = F.cross_entropy(logits_del[:, :-1].reshape(-1, V), labels_del[:, 1:].reshape(-1))
    exclude = ~keep
    got = losses.response_cross_entropy(logits, labels, exclude_mask=exclude)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_onehot_level_ce_keeps_the_level_token():
    logits, labels, _ = _toy_batch()
    got = losses.onehot_level_ce(logits.float(), labels)
    assert got.item() == pytest.approx(_np_ce(logits.numpy(), labels.numpy(), set()), rel=1e-5)


def test_response_cross_entropy_of_an_empty_selection_is_zero_with_a_graph():
    logits = torch.randn(2, 5, V, requires_grad=True)
    labels = torch.full((2, 5), losses.IGNORE_INDEX)
    out = losses.response_cross_entropy(logits, labels)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("closed_set", [True, False])
def test_level_distribution_equals_numpy(closed_set):
    logits, _, _ = _toy_batch()
    level_logits = logits[:, 3]
    probs, mean, std = losses.level_distribution(level_logits, LEVEL_IDS, closed_set=closed_set)
    np_probs, np_mean, np_std = _np_level_stats(level_logits.numpy(), closed_set)
    np.testing.assert_allclose(probs.numpy(), np_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mean.numpy(), np_mean, rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), np_std, rtol=1e-4)
    if closed_set:
        np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, rtol=1e-6)


def test_level_distribution_uses_the_given_centers_and_k():
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0]])
    _, mean, _ = losses.level_distribution(logits, [0, 1, 2], centers=torch.tensor([10.0, 20.0, 30.0]))
    p = np_softmax(np.array([0.0, 1.0, 2.0]))
    assert mean.item() == pytest.approx(float(p @ [10.0, 20.0, 30.0]), rel=1e-6)
    _, mean3, _ = losses.level_distribution(logits, [0, 1, 2])  # default centers 1, 3, 5
    assert mean3.item() == pytest.approx(float(p @ [1.0, 3.0, 5.0]), rel=1e-6)


def test_level_distribution_of_a_one_hot_prediction_has_finite_gradients():
    logits = torch.full((1, V), -1e4)
    logits[0, LEVEL_IDS[2]] = 1e4
    logits.requires_grad_(True)
    _, mean, std = losses.level_distribution(logits, LEVEL_IDS)
    assert mean.item() == pytest.approx(3.0)
    (mean + std).sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- fidelity, in-level


FID_GT = dict(
    mu_a=np.array([3.2, 1.5, 4.4, 2.0, 3.0]),
    s_a=np.array([0.6, 0.3, 0.9, 0.5, 0.7]),
    mu_b=np.array([2.1, 1.9, 4.5, 3.6, 3.0]),
    s_b=np.array([0.4, 0.8, 0.2, 0.5, 0.1]),
)
FID_PRED = dict(
    pmu_a=np.array([3.0, 2.2, 3.9, 2.5, 2.8]),
    ps_a=np.array([0.7, 0.5, 0.6, 0.4, 0.9]),
    pmu_b=np.array([2.6, 1.7, 4.2, 3.1, 3.3]),
    ps_b=np.array([0.5, 0.6, 0.3, 0.8, 0.2]),
)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


@pytest.mark.parametrize("fixed_std", [False, True])
def test_fidelity_loss_equals_eq8(fixed_std):
    g, p = FID_GT, FID_PRED
    ps_a, ps_b = (None, None) if fixed_std else (p["ps_a"], p["ps_b"])
    want = _np_fidelity(g["mu_a"], g["s_a"], g["mu_b"], g["s_b"], p["pmu_a"], ps_a, p["pmu_b"], ps_b)
    got = losses.fidelity_loss(
        *(_t(g[k]) for k in ("mu_a", "s_a", "mu_b", "s_b")),
        _t(p["pmu_a"]),
        None if fixed_std else _t(p["ps_a"]),
        _t(p["pmu_b"]),
        None if fixed_std else _t(p["ps_b"]),
    )
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_fidelity_loss_is_at_its_minimum_when_the_prediction_equals_the_ground_truth():
    g = FID_GT
    args = [_t(g[k]) for k in ("mu_a", "s_a", "mu_b", "s_b")]
    got = losses.fidelity_loss(*args, args[0], args[1], args[2], args[3]).item()
    p = norm.cdf((g["mu_a"] - g["mu_b"]) / np.sqrt(g["s_a"] ** 2 + g["s_b"] ** 2 + EPS))
    floor = np.mean(1 - np.sqrt(p * p + EPS) - np.sqrt((1 - p) ** 2 + EPS))  # slightly below 0 because of eps
    assert got == pytest.approx(floor, abs=1e-6)
    assert abs(got) < 1e-4
    # any other prediction costs more
    worse = losses.fidelity_loss(*args, args[0] + 0.3, args[1], args[2], args[3]).item()
    assert worse > got + 1e-4


def test_fidelity_loss_is_symmetric_under_swapping_a_and_b():
    g, p = FID_GT, FID_PRED
    ab = losses.fidelity_loss(
        _t(g["mu_a"]), _t(g["s_a"]), _t(g["mu_b"]), _t(g["s_b"]),
        _t(p["pmu_a"]), _t(p["ps_a"]), _t(p["pmu_b"]), _t(p["ps_b"]),
    )  # fmt: skip
    ba = losses.fidelity_loss(
        _t(g["mu_b"]), _t(g["s_b"]), _t(g["mu_a"]), _t(g["s_a"]),
        _t(p["pmu_b"]), _t(p["ps_b"]), _t(p["pmu_a"]), _t(p["ps_a"]),
    )  # fmt: skip
    assert ab.item() == pytest.approx(ba.item(), abs=1e-7)


def test_fidelity_loss_detach_pred_std_stops_only_the_std_gradient():
    g, p = FID_GT, FID_PRED
    grads = {}
    for detach in (False, True):
        mu_a, s_a = _t(p["pmu_a"]).requires_grad_(), _t(p["ps_a"]).requires_grad_()
        out = losses.fidelity_loss(
            _t(g["mu_a"]), _t(g["s_a"]), _t(g["mu_b"]), _t(g["s_b"]),
            mu_a, s_a, _t(p["pmu_b"]), _t(p["ps_b"]), detach_pred_std=detach,
        )  # fmt: skip
        s_grad, mu_grad = torch.autograd.grad(out, [s_a, mu_a], allow_unused=True)
        grads[detach] = (s_grad, mu_grad)
    assert grads[False][0].abs().sum() > 0
    assert grads[True][0] is None or grads[True][0].abs().sum() == 0
    torch.testing.assert_close(grads[True][1], grads[False][1])


def test_fidelity_loss_needs_both_predicted_stds_or_neither():
    x = torch.ones(2)
    with pytest.raises(ValueError):
        losses.fidelity_loss(x, x, x, x, x, x, x, None)


def test_in_level_loss_equals_numpy_and_floors_the_batch_mean():
    logits, _, _ = _toy_batch()
    level_logits = logits[:, 1].float()
    want = np.mean(1 - np_softmax(level_logits.double().numpy(), axis=-1)[:, LEVEL_IDS].sum(-1))
    assert want > 0.01
    assert losses.in_level_loss(level_logits, LEVEL_IDS).item() == pytest.approx(want, rel=1e-5)
    confident = torch.full((B, V), -20.0)
    confident[:, LEVEL_IDS] = 5.0
    confident.requires_grad_(True)
    out = losses.in_level_loss(confident, LEVEL_IDS)
    assert out.item() == pytest.approx(0.01)
    out.backward()
    assert torch.equal(confident.grad, torch.zeros_like(confident))


# ---------------------------------------------------------------- the DeQA-Score total


def _targets(labels, soft, mos, std):
    return losses.LevelTargets(
        labels=labels,
        level_pos=losses.level_positions(labels, LEVEL_IDS),
        soft_labels=soft,
        mos=torch.tensor(mos),
        std=torch.tensor(std),
    )


def _gt(ta, tb):
    """Float64 ground truth (mu_a, s_a, mu_b, s_b) of two LevelTargets."""
    return [x.double().numpy() for x in (ta.mos, ta.std, tb.mos, tb.std)]


def test_deqa_loss_parts_equal_the_equations_and_the_total_their_weighted_sum():
    logits_a, labels_a, soft_a = _toy_batch(0)
    logits_b, labels_b, soft_b = _toy_batch(1)
    logits_a, logits_b = logits_a.float(), logits_b.float()
    ta = _targets(labels_a, soft_a.float(), [60.0, 20.0, 75.0, 41.0], [9.0, 12.0, 7.0, 15.0])
    tb = _targets(labels_b, soft_b.float(), [55.0, 33.0, 70.0, 40.0], [11.0, 8.0, 10.0, 14.0])
    w = dict(w_fid=0.7, w_tok=0.3, w_kl=2.0, w_in_level=0.4)
    out = losses.deqa_loss(logits_a, ta, LEVEL_IDS, logits_b, tb, fixed_std=False, detach_pred_std=False, **w)

    ce = kl = inl = 0.0
    mus, sds = [], []
    for logits, t, soft in ((logits_a, ta, soft_a), (logits_b, tb, soft_b)):
        lg = logits.double().numpy()
        pos = t.level_pos.numpy()
        level_logits = lg[np.arange(B), pos - 1]
        ce += _np_ce(lg, t.labels.numpy(), {(b, int(pos[b])) for b in range(B)})
        kl += _np_kl(level_logits, soft.numpy())
        inl += max(0.01, np.mean(1 - np_softmax(level_logits, axis=-1)[:, LEVEL_IDS].sum(-1)))
        _, mu, sd = _np_level_stats(level_logits)
        mus.append(mu)
        sds.append(sd)
    fid = _np_fidelity(*_gt(ta, tb), mus[0], sds[0], mus[1], sds[1])

    assert out.cross_entropy.item() == pytest.approx(ce, rel=1e-5)
    assert out.kl.item() == pytest.approx(kl, rel=1e-5)
    assert out.in_level.item() == pytest.approx(inl, rel=1e-5)
    assert out.fidelity.item() == pytest.approx(fid, rel=1e-4, abs=1e-6)
    weighted = w["w_fid"] * fid + w["w_tok"] * (ce + w["w_kl"] * kl) + w["w_in_level"] * inl
    assert out.total.item() == pytest.approx(weighted, rel=1e-5)
    assert set(out.log_dict()) == {"total", "fidelity", "cross_entropy", "kl", "in_level"}


def test_deqa_loss_defaults_are_the_reference_flags():
    logits_a, labels_a, soft_a = _toy_batch(0)
    logits_b, labels_b, soft_b = _toy_batch(1)
    ta = _targets(labels_a, soft_a.float(), [3.0, 2.0, 4.5, 1.2], [0.5, 0.4, 0.3, 0.6])
    tb = _targets(labels_b, soft_b.float(), [2.5, 3.3, 4.0, 1.1], [0.6, 0.5, 0.7, 0.2])
    out = losses.deqa_loss(logits_a.float(), ta, LEVEL_IDS, logits_b.float(), tb)
    assert out.in_level.item() > 0.01  # logged, but weight_in_level=None in the released runs: not in the total
    # fixed predicted std 1 (use_fix_std=True), closed-set means (closeset_rating_loss=True)
    _, mu_a, _ = _np_level_stats(logits_a.numpy()[np.arange(B), ta.level_pos.numpy() - 1])
    _, mu_b, _ = _np_level_stats(logits_b.numpy()[np.arange(B), tb.level_pos.numpy() - 1])
    fid = _np_fidelity(*_gt(ta, tb), mu_a, None, mu_b, None)
    assert out.fidelity.item() == pytest.approx(fid, rel=1e-4, abs=1e-6)
    want = 1.0 * out.fidelity + 0.05 * (out.cross_entropy + 1.0 * out.kl)
    assert out.total.item() == pytest.approx(want.item(), rel=1e-6)


def test_deqa_loss_without_pairs_is_the_token_loss_of_one_batch():
    logits, labels, soft = _toy_batch(0)
    ta = _targets(labels, soft.float(), [3.0, 2.0, 4.5, 1.2], [0.5, 0.4, 0.3, 0.6])
    out = losses.deqa_loss(logits.float(), ta, LEVEL_IDS)
    assert out.fidelity.item() == 0.0
    assert out.total.item() == pytest.approx(0.05 * (out.cross_entropy + out.kl).item(), rel=1e-6)
    with pytest.raises(ValueError):
        losses.deqa_loss(logits.float(), ta, LEVEL_IDS, logits_b=logits.float())


def test_gradients_flow_through_bf16_logits():
    logits_a, labels_a, soft_a = _toy_batch(0)
    logits_b, labels_b, soft_b = _toy_batch(1)
    la = logits_a.to(torch.bfloat16).requires_grad_(True)
    lb = logits_b.to(torch.bfloat16).requires_grad_(True)
    ta = _targets(labels_a, soft_a.float(), [3.0, 2.0, 4.5, 1.2], [0.5, 0.4, 0.3, 0.6])
    tb = _targets(labels_b, soft_b.float(), [2.5, 3.3, 4.0, 1.1], [0.6, 0.5, 0.7, 0.2])
    out = losses.deqa_loss(la, ta, LEVEL_IDS, lb, tb, fixed_std=False, detach_pred_std=False, w_in_level=1.0)
    assert out.total.dtype == torch.float32
    out.total.backward()
    for g in (la.grad, lb.grad):
        assert g.dtype == torch.bfloat16
        assert torch.isfinite(g.float()).all()
        assert g.float().abs().sum() > 0
    # the bf16 loss agrees with the float32 one on the same (rounded) logits
    ref = losses.deqa_loss(la.detach().float(), ta, LEVEL_IDS, lb.detach().float(), tb, fixed_std=False, w_in_level=1.0)
    assert out.total.item() == pytest.approx(ref.total.item(), rel=1e-6)

    pred = torch.tensor([3.1, 2.2, 4.0, 1.5], dtype=torch.bfloat16, requires_grad=True)
    la.grad = None
    q = losses.qscorer_loss(la, labels_a, pred, torch.tensor([3.0, 2.0, 4.5, 1.2]), w_nin=0.5, w_rank=1.0)
    q.total.backward()
    assert torch.isfinite(la.grad.float()).all() and la.grad.float().abs().sum() > 0
    assert torch.isfinite(pred.grad.float()).all() and pred.grad.float().abs().sum() > 0


# ---------------------------------------------------------------- Q-Scorer


def test_regression_mse_clamps_the_prediction_to_0_5():
    pred = torch.tensor([6.0, 2.5, -1.0, 4.0], requires_grad=True)
    target = torch.tensor([4.5, 3.0, 1.0, 4.0])
    out = losses.regression_mse(pred, target)
    want = np.mean((np.clip([6.0, 2.5, -1.0, 4.0], 0, 5) - target.double().numpy()) ** 2)
    assert out.item() == pytest.approx(want, rel=1e-6)
    out.backward()
    assert pred.grad[0] == 0 and pred.grad[2] == 0 and pred.grad[1] != 0
    assert losses.regression_mse(pred, target, clamp=None).item() == pytest.approx(
        np.mean((pred.detach().double().numpy() - target.double().numpy()) ** 2), rel=1e-6
    )


def _np_nin(pred: np.ndarray, target: np.ndarray, p: float, q: float) -> float:
    n = len(pred)
    pc, tc = pred - pred.mean(), target - target.mean()
    pn = pc / np.linalg.norm(pc, ord=q)
    tn = tc / np.linalg.norm(tc, ord=q)
    return float(np.sum(np.abs(pn - tn) ** p) / (2**p * n ** max(0.0, 1 - p / q)))


@pytest.mark.parametrize(("p", "q"), [(1.0, 2.0), (2.0, 2.0), (1.0, 1.0)])
def test_norm_in_norm_equals_li_et_al(p, q):
    pred = np.array([2.9, 1.2, 4.4, 3.3, 2.0, 3.9])
    target = np.array([3.1, 1.5, 4.8, 2.9, 2.6, 4.2])
    got = losses.norm_in_norm_loss(torch.tensor(pred), torch.tensor(target), p=p, q=q)
    assert got.item() == pytest.approx(_np_nin(pred, target, p, q), rel=1e-5)
    assert 0.0 <= got.item() <= 1.0


def test_norm_in_norm_is_invariant_to_affine_rescaling_of_the_prediction():
    g = torch.Generator().manual_seed(3)
    pred, target = torch.rand(8, generator=g) * 4 + 1, torch.rand(8, generator=g) * 4 + 1
    base = losses.norm_in_norm_loss(pred, target)
    for a, b in ((3.7, -2.0), (0.25, 10.0)):
        assert losses.norm_in_norm_loss(a * pred + b, target).item() == pytest.approx(base.item(), rel=1e-5)
    assert losses.norm_in_norm_loss(target * 2 + 1, target).item() == pytest.approx(0.0, abs=1e-6)
    one = torch.tensor([3.0], requires_grad=True)
    out = losses.norm_in_norm_loss(one, torch.tensor([2.0]))
    out.backward()
    assert out.item() == 0.0 and one.grad.item() == 0.0
    with pytest.raises(ValueError):
        losses.norm_in_norm_loss(pred, target, p=0.5)


def test_pairwise_ranking_loss_is_zero_when_ordered_by_the_margin():
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert losses.pairwise_ranking_loss(torch.tensor([1.0, 1.5, 2.0, 2.5]), target, margin=0.5).item() == 0.0
    # one step closer than the margin costs; computed pair by pair
    pred = np.array([1.0, 1.3, 2.0, 1.9])
    got = losses.pairwise_ranking_loss(torch.tensor(pred), target, margin=0.5).item()
    t = target.double().numpy()
    terms = [max(0.0, 0.5 - (pred[i] - pred[j])) for i in range(4) for j in range(4) if t[i] > t[j]]
    assert got == pytest.approx(np.mean(terms), rel=1e-6)
    assert got > 0


def test_pairwise_ranking_loss_skips_ties_other_groups_and_single_images():
    pred = torch.tensor([3.0, 1.0, 2.0, 0.0])
    target = torch.tensor([1.0, 2.0, 1.0, 2.0])
    groups = torch.tensor([0, 1, 0, 1])  # every ordered pair crosses groups or ties
    assert losses.pairwise_ranking_loss(pred, target, groups=groups).item() == 0.0
    assert losses.pairwise_ranking_loss(pred, target).item() > 0
    one = torch.tensor([2.0], requires_grad=True)
    out = losses.pairwise_ranking_loss(one, torch.tensor([3.0]), margin=1.0)
    out.backward()
    assert out.item() == 0.0 and one.grad.item() == 0.0


def test_same_group_pairs():
    pairs = losses.same_group_pairs(torch.tensor([0, 1, 0, 0, 1]))
    assert pairs.tolist() == [[0, 2], [0, 3], [1, 4], [2, 3]]
    assert losses.same_group_pairs(torch.tensor([0, 1])).shape == (0, 2)


def test_qscorer_loss_reference_default_is_005_times_ce_plus_mse():
    logits, labels, _ = _toy_batch()
    pred = torch.tensor([3.1, 5.6, 4.0, 1.5])
    target = torch.tensor([3.0, 4.9, 4.5, 1.2])
    out = losses.qscorer_loss(logits.float(), labels, pred, target)
    ce = _np_ce(logits.numpy(), labels.numpy(), set())  # plain CE, score token included
    mse = np.mean((np.clip(pred.double().numpy(), 0, 5) - target.double().numpy()) ** 2)
    assert out.cross_entropy.item() == pytest.approx(ce, rel=1e-5)
    assert out.mse.item() == pytest.approx(mse, rel=1e-6)
    assert out.total.item() == pytest.approx(0.05 * (ce + mse), rel=1e-5)


def test_qscorer_loss_options_add_up_with_their_weights():
    logits, labels, soft = _toy_batch()
    pred = torch.tensor([3.1, 3.3, 4.0, 1.5])  # pair (0, 1) misordered
    target = torch.tensor([3.0, 2.9, 4.5, 1.2])
    std = torch.tensor([0.5, 0.4, 0.3, 0.6])
    groups = torch.tensor([0, 0, 1, 1])
    w = dict(w_tok=0.2, w_mse=1.5, w_kl=0.7, w_nin=0.5, w_rank=0.3, w_fid=0.9)
    out = losses.qscorer_loss(
        logits.float(), labels, pred, target, score_token_ids=LEVEL_IDS, soft_labels=soft.float(),
        target_std=std, groups=groups, margin=0.2, **w,
    )  # fmt: skip
    pos = losses.level_positions(labels, LEVEL_IDS).numpy()
    lg = logits.numpy()
    ce = _np_ce(lg, labels.numpy(), {(b, int(pos[b])) for b in range(B)})  # KL on -> score token out of the CE
    kl = _np_kl(lg[np.arange(B), pos - 1], soft.numpy())
    t64, s64, p64 = (x.double().numpy() for x in (target, std, pred))
    fid = _np_fidelity(t64[[0, 2]], s64[[0, 2]], t64[[1, 3]], s64[[1, 3]], p64[[0, 2]], None, p64[[1, 3]], None)
    assert out.cross_entropy.item() == pytest.approx(ce, rel=1e-5)
    assert out.kl.item() == pytest.approx(kl, rel=1e-5)
    assert out.fidelity.item() == pytest.approx(fid, rel=1e-4, abs=1e-6)
    assert out.norm_in_norm.item() == pytest.approx(_np_nin(p64, t64, 1.0, 2.0), rel=1e-5)
    parts = (
        out.cross_entropy + w["w_mse"] * out.mse + w["w_kl"] * out.kl + w["w_nin"] * out.norm_in_norm
        + w["w_rank"] * out.ranking + w["w_fid"] * out.fidelity
    )  # fmt: skip
    # in-dataset pairs only: (0, 1) costs 0.2 - (3.1 - 3.3) = 0.4, (2, 3) is ordered by more than the margin
    assert out.ranking.item() == pytest.approx(0.4 / 2, rel=1e-6)
    assert out.total.item() == pytest.approx(w["w_tok"] * parts.item(), rel=1e-6)
    with pytest.raises(ValueError):
        losses.qscorer_loss(logits.float(), labels, pred, target, w_fid=1.0)
