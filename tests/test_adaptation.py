"""Few-shot losses (CE', KD) against brute force, the adaptation engine against those losses, batching, episode
independence, and adaptation quality on the tiny model pre-trained on the procedural dataset."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gfss_hf import _solver
from gfss_hf._solver import _DENSE_COLUMNS, LossSpec, _adjoint, _build_objective, _shifted_logits
from gfss_hf.adaptation import (
    AdaptationConfig,
    CarryOverState,
    adapt,
    adapt_fss,
    adapt_gfss,
    predict,
)
from gfss_hf.losses import distillation_loss, few_shot_cross_entropy


# ---------------------------------------------------------------------------------------------------------------------
# Losses against a brute-force per-pixel computation
# ---------------------------------------------------------------------------------------------------------------------
def _brute_ce(logits, labels, annotated, weights=None, ignore=255):
    total, denom = 0.0, 0.0
    b, c, h, w = logits.shape
    for n in range(b):
        for i in range(h):
            for j in range(w):
                y = int(labels[n, i, j])
                if y == ignore:
                    continue
                p = torch.softmax(logits[n, :, i, j], dim=0)
                if y == 0:
                    value = -torch.log(sum(p[k] for k in range(c) if not annotated[n, k]))
                else:
                    value = -torch.log(p[y])
                wt = 1.0 if weights is None else float(weights[n, i, j])
                total = total + wt * value
                denom += wt
    return total / denom


def _brute_kd(student, teacher, mask, scale):
    total, count = 0.0, 0
    b, c, h, w = student.shape
    t = teacher.shape[1]
    for n in range(b):
        for i in range(h):
            for j in range(w):
                if mask is not None and not mask[n, i, j]:
                    continue
                p = torch.softmax(student[n, :, i, j], dim=0)
                q = torch.softmax(teacher[n, :, i, j], dim=0)
                folded = [p[0] + sum(p[k] for k in range(t, c))] + [p[k] for k in range(1, t)]
                value = -sum(q[k] * torch.log(folded[k]) for k in range(t))
                total = total + (value / t if scale == "reference" else value)
                count += 1
    return total / count


@pytest.mark.parametrize("num_novel", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_few_shot_cross_entropy_matches_brute_force(num_novel, weighted):
    g = torch.Generator().manual_seed(num_novel)
    num_teacher = 3
    c = num_teacher + num_novel
    logits = (torch.randn(2, c, 3, 4, generator=g) * 2).requires_grad_(True)
    # Image n is annotated for novel class n % num_novel (binary per image) -- several classes across images.
    annotated = torch.zeros(2, c, dtype=torch.bool)
    labels = torch.zeros(2, 3, 4, dtype=torch.long)
    for n in range(2):
        row = num_teacher + n % num_novel
        annotated[n, row] = True
        labels[n][torch.rand(3, 4, generator=g) < 0.4] = row
    labels[0, 0, 0] = 255
    weights = torch.rand(2, 3, 4, generator=g) + 0.5 if weighted else None
    ours = few_shot_cross_entropy(logits, labels, annotated=annotated, pixel_weights=weights)
    ref = _brute_ce(logits, labels, annotated, weights)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    (g1,) = torch.autograd.grad(ours, logits)
    (g2,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_few_shot_cross_entropy_label_map_with_two_annotated_classes():
    """A label map annotating two novel rows: background pixels exclude both (Eq. 4 generalised)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 5, 4, 4, generator=g, requires_grad=True)
    labels = torch.tensor([[0, 3, 4, 0], [3, 3, 0, 4], [0, 0, 0, 0], [4, 255, 0, 3]])[None]
    ours = few_shot_cross_entropy(logits, labels)  # annotated inferred: rows 3 and 4
    annotated = torch.tensor([[False, False, False, True, True]])
    torch.testing.assert_close(ours, _brute_ce(logits, labels, annotated), rtol=1e-5, atol=1e-6)


def test_few_shot_cross_entropy_two_way_is_plain_cross_entropy():
    logits = torch.randn(2, 2, 5, 5)
    labels = torch.randint(0, 2, (2, 5, 5))
    labels[0, 0] = 255
    torch.testing.assert_close(
        few_shot_cross_entropy(logits, labels), F.cross_entropy(logits, labels, ignore_index=255)
    )


@pytest.mark.parametrize("num_novel", [1, 2])
@pytest.mark.parametrize("scale", ["reference", "paper"])
def test_distillation_loss_matches_brute_force(num_novel, scale):
    g = torch.Generator().manual_seed(7 + num_novel)
    teacher = torch.randn(2, 4, 3, 3, generator=g) * 2
    student = torch.randn(2, 4 + num_novel, 3, 3, generator=g).requires_grad_(True)
    mask = torch.rand(2, 3, 3, generator=g) < 0.7
    ours = distillation_loss(student, teacher, mask=mask, scale=scale)
    ref = _brute_kd(student, teacher, mask, scale)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    (g1,) = torch.autograd.grad(ours, student)
    (g2,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
    assert distillation_loss(student, teacher, scale="reference").item() * 4 == pytest.approx(
        distillation_loss(student, teacher, scale="paper").item(), rel=1e-6
    )


def test_losses_reject_bad_input():
    with pytest.raises(ValueError, match="not a classifier row"):
        few_shot_cross_entropy(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="row 0"):
        few_shot_cross_entropy(
            torch.randn(1, 3, 2, 2),
            torch.zeros(1, 2, 2, dtype=torch.long),
            annotated=torch.tensor([[True, False, False]]),
        )
    with pytest.raises(ValueError, match="scale="):
        distillation_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 2, 2, 2), scale="printed")
    with pytest.raises(ValueError, match="extend the teacher"):
        distillation_loss(torch.randn(1, 2, 2, 2), torch.randn(1, 3, 2, 2))


# ---------------------------------------------------------------------------------------------------------------------
# The engine equals CE' + gamma * KD of losses.py (value and one SGD step)
# ---------------------------------------------------------------------------------------------------------------------
def _toy_episode(seed=0, shots=2, num_novel=1, dim=6, feat=5, size=17, teacher_rows=4, bias=False):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(shots, dim, feat, feat, generator=g)
    labels = torch.zeros(shots, size, size, dtype=torch.long)
    classes = torch.arange(shots) % num_novel
    for k in range(shots):
        labels[k][torch.rand(size, size, generator=g) < 0.3] = 1
        labels[k, -3:, :] = 255  # padding-like ignored rows
    base_weight = torch.randn(teacher_rows, dim, generator=g)
    base_bias = torch.randn(teacher_rows, generator=g) if bias else None
    return features, labels, classes, base_weight, base_bias


def _autograd_step(features, labels, base_weight, base_bias, classes, config, align_corners=True):
    """One step of the library's plain autograd reference (`gfss_hf._solver.reference_loss` + autograd)."""
    return adapt_gfss(
        features,
        labels,
        base_weight,
        base_bias,
        support_classes=classes,
        config=config.replace(steps=1, solver="autograd"),
        align_corners=align_corners,
    )


def test_reference_solver_is_the_mean_of_the_losses():
    """The autograd reference's loss of one episode is `few_shot_cross_entropy + gamma * distillation_loss` of
    losses.py on upsampled logits, with labels mapped to rows by hand: the definition every solver must match."""
    features, labels, classes, base_weight, _ = _toy_episode(shots=1)
    config = AdaptationConfig(lr=0.5)
    init = adapt_gfss(features, labels, base_weight, support_classes=classes, config=config.replace(steps=0))
    ref = _autograd_step(features, labels, base_weight, None, classes, config)
    t = base_weight.shape[0]

    def logits_of(w):
        z = torch.einsum("cd,kdhw->kchw", w, features)
        return F.interpolate(z, size=labels.shape[-2:], mode="bilinear", align_corners=True)

    rows = torch.where(labels == 1, t, labels)  # the novel class is the row after the teacher's
    annotated = torch.zeros(1, t + 1, dtype=torch.bool)
    annotated[:, t] = True
    w = init.weight.clone().requires_grad_(True)
    loss = few_shot_cross_entropy(logits_of(w), rows, annotated=annotated) + config.gamma * distillation_loss(
        logits_of(w), logits_of(base_weight), mask=labels != 255
    )
    torch.testing.assert_close(ref.loss_history[0], loss.detach(), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, [w])
    torch.testing.assert_close(ref.weight, init.weight - config.lr * grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"kd_skip_novel": True},
        {"ce_weighting": "reference", "kd_scale": "paper", "gamma": 5.0},
        {"kd_average_over_padding": True},
        {"loss_resolution": "feature"},
        {"align_corners": False, "novel_init": "prototype"},
        {"normalize_features": True, "novel_init": "kaiming_uniform"},
        {"gamma": 0.0},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
@pytest.mark.parametrize("num_novel,bias", [(1, False), (2, True)])
def test_gfss_engine_matches_reference_losses(overrides, num_novel, bias):
    features, labels, classes, base_weight, base_bias = _toy_episode(num_novel=num_novel, bias=bias, shots=2)
    overrides = dict(overrides)
    align_corners = overrides.pop("align_corners", True)
    config = AdaptationConfig(**{"lr": 0.5, **overrides})
    kwargs = {"support_classes": classes, "align_corners": align_corners}
    init = adapt_gfss(features, labels, base_weight, base_bias, config=config.replace(steps=0), **kwargs)
    one = adapt_gfss(features, labels, base_weight, base_bias, config=config.replace(steps=1), **kwargs)
    assert init.weight.shape == (base_weight.shape[0] + num_novel, features.shape[1])
    torch.testing.assert_close(init.weight[:4], base_weight)  # a fresh copy of the pre-trained rows
    ref = _autograd_step(features, labels, base_weight, base_bias, classes, config, align_corners)
    torch.testing.assert_close(one.loss_history, ref.loss_history, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one.weight, ref.weight, rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(one.bias, ref.bias, rtol=1e-5, atol=1e-6)
        assert torch.all(init.bias[4:] == 0)


def test_fss_engine_is_plain_cross_entropy():
    features, labels, _, _, _ = _toy_episode(seed=3, shots=1)
    config = AdaptationConfig(method="fss", lr=0.5)
    init = adapt_fss(features, labels, config=config.replace(steps=0), bias=True)
    one = adapt(features, labels, config=config.replace(steps=1), bias=True)
    w = init.weight.clone().requires_grad_(True)
    b = init.bias.clone().requires_grad_(True)
    logits = F.interpolate(
        torch.einsum("cd,kdhw->kchw", w, features) + b[None, :, None, None],
        size=labels.shape[-2:],
        mode="bilinear",
        align_corners=True,
    )
    ref = F.cross_entropy(logits, labels, ignore_index=255)
    torch.testing.assert_close(one.loss_history[0], ref.detach(), rtol=1e-5, atol=1e-6)
    gw, gb = torch.autograd.grad(ref, [w, b])
    torch.testing.assert_close(one.weight, init.weight - 0.5 * gw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one.bias, init.bias - 0.5 * gb, rtol=1e-5, atol=1e-6)


def test_reference_weighting_survives_an_empty_foreground():
    """METHOD.md 8.3: the reference's n_bg / n_fg divides by zero when a mask has no foreground; here it does not."""
    features, labels, _, base_weight, _ = _toy_episode(shots=1)
    labels[labels == 1] = 0
    clf = adapt_gfss(
        features, labels, base_weight, num_novel_classes=1, config=AdaptationConfig(ce_weighting="reference", steps=3)
    )
    assert torch.isfinite(clf.weight).all() and torch.isfinite(clf.loss_history).all()


# ---------------------------------------------------------------------------------------------------------------------
# The band layout of the input-resolution loss (`_RowBands`): upsampling, exp, adjoint
# ---------------------------------------------------------------------------------------------------------------------
def _objective_for(h, w, height, width, align_corners, classes=3):
    labels = torch.zeros(1, height, width, dtype=torch.long)
    spec = LossSpec(
        labels=labels,
        valid=torch.ones_like(labels, dtype=torch.bool),
        annotated=torch.zeros(1, classes, dtype=torch.bool),
        ce_weights=None,
        ce_denom=torch.ones(1),
        kd_mask=None,
        kd_denom=None,
        teacher_logits=None,
        gamma=0.0,
        kd_scale="reference",
        num_teacher=classes,
        num_classes=classes,
        feature_size=(h, w),
        align_corners=align_corners,
    )
    return _build_objective(spec)


def _unband(banded, bands, n, c, height, width):
    """(1, N, C, S) in band layout -> (N, C, H, W), the padding dropped."""
    flat = banded.view(n, c, bands.rows_per_band * bands.num_bands, width)
    rows = flat[:, :, bands.valid]
    return rows[:, :, torch.argsort(bands.index[bands.valid])].view(n, c, height, width)


# (h, w) -> (H, W): uniform bands (473 = 8 * 59 + 1), uneven bands, a single feature row, small maps, and more
# feature columns than `_DENSE_COLUMNS` (the columns through ATen instead of a dense matrix).
SIZES = [
    ((60, 60), (473, 473)),
    ((7, 5), (50, 23)),
    ((1, 4), (9, 13)),
    ((12, 9), (96, 70)),
    ((5, 5), (17, 17)),
    ((3, _DENSE_COLUMNS + 4), (19, 8 * _DENSE_COLUMNS + 5)),
]


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{s[0]}->{s[1]}")
def test_band_upsampling_equals_bilinear_interpolation_and_its_adjoint(sizes, align_corners):
    (h, w), (height, width) = sizes
    n, c = 2, 3
    objective = _objective_for(h, w, height, width, align_corners, classes=c)
    bands = objective.bands
    g = torch.Generator().manual_seed(h * 100 + height)
    z_low = torch.randn(n, c, h * w, generator=g) * 4
    low_max = z_low.amax(dim=1, keepdim=True)
    expected = F.interpolate(
        (z_low - low_max).view(n, c, h, w), size=(height, width), mode="bilinear", align_corners=align_corners
    )
    logits = _shifted_logits(z_low, low_max, h, w, objective)
    torch.testing.assert_close(_unband(logits, bands, n, c, height, width), expected, rtol=1e-5, atol=1e-4)
    exp = _shifted_logits(z_low, low_max, h, w, objective, exp=True)
    torch.testing.assert_close(_unband(exp, bands, n, c, height, width), expected.exp(), rtol=1e-4, atol=1e-6)
    # The adjoint: <U x, y> = <x, U^T y> for y zero at the padding, and equal to ATen's backward.
    y = torch.randn(n, c, height, width, generator=g)
    y_banded = torch.stack([bands.gather(y[:, k]) for k in range(c)], dim=1).reshape(1, n, c, -1)
    adjoint = _adjoint(y_banded, h, w, objective)
    expected_adjoint = torch.ops.aten.upsample_bilinear2d_backward(y, [height, width], [n, c, h, w], align_corners)
    torch.testing.assert_close(adjoint, expected_adjoint.reshape(n, c, h * w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("exact_path", ["whole map", "pixel by pixel"])
def test_band_exp_without_the_progression_when_logits_are_extreme(exact_path, monkeypatch):
    """Logit gaps beyond the exp floor take the clamped path (no denormals, no 0 * inf); a step still equals autograd
    on the same loss with exact per-pixel maxima, even where every class is far below the interpolated maximum."""
    (h, w), (height, width) = (7, 5), (50, 23)
    objective = _objective_for(h, w, height, width, True)
    z_low = torch.zeros(1, 3, h * w)
    z_low[0, 0, ::2] = 400.0  # class 0 dominates every other pixel, class 1 the others: crossings in between
    z_low[0, 1, 1::2] = 400.0
    low_max = z_low.amax(dim=1, keepdim=True)
    exp = _shifted_logits(z_low, low_max, h, w, objective, exp=True)
    assert torch.isfinite(exp).all() and float(exp[exp > 0].min()) >= math.exp(-87.0) * 0.999
    monkeypatch.setattr(_solver, "_DENSE_EXACT_FACTOR", 10**9 if exact_path == "whole map" else 0)
    features, labels, classes, base_weight, _ = _toy_episode(seed=4, feat=5, size=17)
    config = AdaptationConfig(lr=0.5)
    big = base_weight * 300.0
    one = adapt_gfss(features, labels, big, support_classes=classes, config=config.replace(steps=1))
    ref = _autograd_step(features, labels, big, None, classes, config)
    torch.testing.assert_close(one.loss_history, ref.loss_history, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(one.weight, ref.weight, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("align_corners", [True, False])
def test_many_steps_equal_plain_autograd_sgd(align_corners):
    """100 steps of the engine (bands, progression, folded constants) against plain autograd SGD on losses.py."""
    features, labels, classes, base_weight, _ = _toy_episode(seed=5, feat=7, size=50)
    config = AdaptationConfig(steps=100)
    kwargs = {"support_classes": classes, "align_corners": align_corners}
    engine = adapt_gfss(features, labels, base_weight, config=config, **kwargs)
    reference = adapt_gfss(features, labels, base_weight, config=config.replace(solver="autograd"), **kwargs)
    assert config.solver == "exact"  # the default
    torch.testing.assert_close(engine.loss_history, reference.loss_history, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(engine.weight, reference.weight, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Batching, determinism, episode independence
# ---------------------------------------------------------------------------------------------------------------------
def test_batched_equals_one_by_one():
    episodes = [_toy_episode(seed=s, shots=2, num_novel=2, bias=True) for s in range(3)]
    base_weight, base_bias = episodes[0][3], episodes[0][4]
    config = AdaptationConfig(steps=20)
    feats = torch.stack([e[0] for e in episodes])
    labels = torch.stack([e[1] for e in episodes])
    classes = torch.stack([e[2] for e in episodes])
    batched = adapt_gfss(
        feats, labels, base_weight, base_bias, support_classes=classes, config=config, seeds=[5, 6, 7]
    )
    assert batched.weight.shape == (3, 6, 6) and batched.loss_history.shape == (3, 20)
    for i, (f, lab, cls, _, _) in enumerate(episodes):
        single = adapt_gfss(f, lab, base_weight, base_bias, support_classes=cls, config=config, seeds=5 + i)
        torch.testing.assert_close(batched.weight[i], single.weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(batched.bias[i], single.bias, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(batched.loss_history[i], single.loss_history, rtol=1e-4, atol=1e-6)
    query = torch.randn(3, 2, 6, 5, 5)
    logits = predict(query, batched, size=(17, 17))
    assert logits.shape == (3, 2, 6, 17, 17)
    torch.testing.assert_close(logits[1], predict(query[1], batched.episode(1), size=(17, 17)), rtol=1e-5, atol=1e-6)
    fss = adapt_fss(
        feats,
        (labels > 0).long() * (labels != 255) + 255 * (labels == 255),
        config=AdaptationConfig(method="fss", steps=5),
        seeds=[1, 2, 3],
    )
    one = adapt_fss(
        feats[2],
        (labels[2] > 0).long() * (labels[2] != 255) + 255 * (labels[2] == 255),
        config=AdaptationConfig(method="fss", steps=5),
        seeds=3,
    )
    torch.testing.assert_close(fss.weight[2], one.weight, rtol=1e-4, atol=1e-6)


def test_seeded_and_deterministic():
    f, lab, cls, bw, _ = _toy_episode()
    a = adapt_gfss(f, lab, bw, support_classes=cls, config=AdaptationConfig(steps=5, seed=1))
    b = adapt_gfss(f, lab, bw, support_classes=cls, config=AdaptationConfig(steps=5, seed=1))
    c = adapt_gfss(f, lab, bw, support_classes=cls, config=AdaptationConfig(steps=5, seed=2))
    assert torch.equal(a.weight, b.weight)
    assert not torch.equal(a.weight, c.weight)


def test_episodes_do_not_carry_over_unless_legacy():
    first, second = _toy_episode(seed=1), _toy_episode(seed=2)
    base_weight = first[3]
    config = AdaptationConfig(steps=10)
    alone = adapt_gfss(second[0], second[1], base_weight, support_classes=second[2], config=config)
    adapt_gfss(first[0], first[1], base_weight, support_classes=first[2], config=config)
    after = adapt_gfss(second[0], second[1], base_weight, support_classes=second[2], config=config)
    assert torch.equal(alone.weight, after.weight)
    assert torch.equal(base_weight, first[3])  # the pre-trained rows are never written

    legacy = config.replace(legacy_carry_over=True)
    state = CarryOverState()
    legacy_first = adapt_gfss(first[0], first[1], base_weight, support_classes=first[2], config=legacy, state=state)
    assert state.episodes == 1 and torch.equal(state.weight, legacy_first.weight)
    drifted = adapt_gfss(second[0], second[1], base_weight, support_classes=second[2], config=legacy, state=state)
    assert state.episodes == 2
    assert not torch.allclose(drifted.weight, alone.weight, atol=1e-4)
    # A fresh state reproduces the independent episode exactly.
    fresh = adapt_gfss(
        second[0], second[1], base_weight, support_classes=second[2], config=legacy, state=CarryOverState()
    )
    assert torch.equal(fresh.weight, alone.weight)
    with pytest.raises(ValueError, match="CarryOverState"):
        adapt_gfss(first[0], first[1], base_weight, support_classes=first[2], config=legacy)
    with pytest.raises(ValueError, match="legacy_carry_over"):
        adapt_gfss(first[0], first[1], base_weight, support_classes=first[2], config=config, state=CarryOverState())


def test_transductive_term_changes_the_result_and_needs_the_query():
    f, lab, cls, bw, _ = _toy_episode()
    query = torch.randn(1, 6, 5, 5)
    plain = adapt_gfss(f, lab, bw, support_classes=cls, config=AdaptationConfig(steps=5))
    trans = adapt_gfss(
        f, lab, bw, support_classes=cls, query_features=query, config=AdaptationConfig(steps=5, transductive=True)
    )
    assert not torch.allclose(plain.weight, trans.weight)
    with pytest.raises(ValueError, match="query_features"):
        adapt_gfss(f, lab, bw, support_classes=cls, config=AdaptationConfig(transductive=True))


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="kd_scale"):
        AdaptationConfig(kd_scale="printed")
    with pytest.raises(TypeError, match="no field"):
        AdaptationConfig().replace(gama=1.0)
    f, lab, cls, bw, _ = _toy_episode()
    with pytest.raises(ValueError, match="binary"):
        adapt_gfss(f, lab * 2, bw, support_classes=cls)
    with pytest.raises(ValueError, match="one label map per support"):
        adapt_gfss(f, lab[:1], bw, support_classes=cls)
    with pytest.raises(ValueError, match="features per row"):
        adapt_gfss(f, lab, bw[:, :3], support_classes=cls)
    with pytest.raises(ValueError, match="no novel class"):
        adapt_gfss(f, torch.zeros_like(lab), bw)
    with pytest.raises(ValueError, match="base_weight"):
        adapt(f, lab, config=AdaptationConfig())


# ---------------------------------------------------------------------------------------------------------------------
# Quality on the tiny model pre-trained on the procedural dataset (fold 0)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_setup(pretrained_tiny_dir):
    return _make_setup(pretrained_tiny_dir)


def _make_setup(pretrained_tiny_dir):
    from gfss_hf import GFSSImageProcessor, GFSSModel
    from gfss_hf.data.splits import get_split
    from gfss_hf.data.synthetic import SyntheticSegmentation

    model = GFSSModel.from_pretrained(pretrained_tiny_dir).eval()
    processor = GFSSImageProcessor.from_pretrained(pretrained_tiny_dir)
    split = get_split("synthetic", 0)
    data = SyntheticSegmentation("val", num_images=160, image_size=model.config.image_size, seed=0)
    images = [data[i]["image"] for i in range(len(data))]
    labels = np.stack([split.to_gfss_labels(data[i]["label"]) for i in range(len(data))])
    batch = processor(images, segmentation_maps=list(labels), return_tensors="pt")
    with torch.no_grad():
        features = torch.cat([model.extract_features(x) for x in batch["pixel_values"].split(40)])
    labels = batch["labels"]
    pred = predict(features, model.classifier.weight.detach().flatten(1), size=labels.shape[-2:]).argmax(1)
    base_iou = [_pooled_iou(pred, labels, c) for c in range(1, model.config.num_base_classes + 1)]
    return {
        "model": model,
        "features": features,
        "labels": labels,
        "split": split,
        "base_miou": float(np.mean(base_iou)),
    }


def _require_functional_model(setup):
    # Adaptation quality can only be judged on features that segment something: a pre-trained model that predicts
    # background everywhere makes every novel IoU ~0 whatever the fine-tuning does.
    assert setup["base_miou"] > 0.03, (
        f"the pretrained_tiny_dir model segments no base class (base mIoU {setup['base_miou']:.3f} on synthetic val); "
        "fix the pre-training of the fixture before judging adaptation quality."
    )


def _pooled_iou(pred, target, cls):
    valid = target != 255
    inter = ((pred == cls) & (target == cls) & valid).sum().item()
    union = (((pred == cls) | (target == cls)) & valid).sum().item()
    return inter / max(union, 1)


def _episodes(setup, shots=1, num_episodes=6, queries=12, min_pixels=300):
    """Per novel row: supports where it covers >= min_pixels, queries where it is present (held out from supports)."""
    labels = setup["labels"]
    b = setup["model"].config.num_base_classes
    out = []
    for row in range(b + 1, b + 1 + len(setup["split"].novel_ids)):
        counts = (labels == row).flatten(1).sum(1)
        support_pool = torch.nonzero(counts >= min_pixels).flatten().tolist()
        query_pool = [i for i in torch.nonzero(counts > 0).flatten().tolist() if i not in support_pool[:num_episodes]]
        for e in range(min(num_episodes, len(support_pool)) // shots):
            out.append((row, support_pool[e * shots : (e + 1) * shots], query_pool[:queries]))
    return out


def _run(setup, config, episodes):
    """Novel IoU (pooled over episodes) and base agreement with the pre-trained model on the same queries."""
    model, feats, labels = setup["model"], setup["features"], setup["labels"]
    b = model.config.num_base_classes
    weight = model.classifier.weight.detach().flatten(1)
    size = labels.shape[-2:]
    inter = union = 0
    agree = total = 0
    for row, supports, queries in episodes:
        sup_labels = torch.where(labels[supports] == 255, 255, (labels[supports] == row).long())
        q = feats[queries]
        if config.method == "fss":
            clf = adapt_fss(feats[supports], sup_labels, config=config)
            pred = predict(q, clf, size=size).argmax(1)
            pred = torch.where(pred == 1, row, 0)
        else:
            clf = adapt_gfss(feats[supports], sup_labels, weight, support_classes=[0] * len(supports), config=config)
            pred = predict(q, clf, size=size).argmax(1)
            pred = torch.where(pred == b + 1, row, pred)
            # Base behaviour on base-only pixels: agreement with the pre-trained prediction.
            pre = predict(q, weight, size=size).argmax(1)
            keep = (labels[queries] != 255) & (labels[queries] <= b)
            agree += ((pred == pre) & keep).sum().item()
            total += keep.sum().item()
        target = labels[queries]
        valid = target != 255
        inter += ((pred == row) & (target == row) & valid).sum().item()
        union += (((pred == row) | (target == row)) & valid).sum().item()
    return inter / max(union, 1), (agree / total if total else math.nan)


@pytest.mark.slow
def test_one_shot_adaptation_beats_untrained_classifier(synthetic_setup):
    _require_functional_model(synthetic_setup)
    episodes = _episodes(synthetic_setup, shots=1, num_episodes=3)
    assert len(episodes) >= 10
    trained, _ = _run(synthetic_setup, AdaptationConfig(method="fss"), episodes)
    untrained, _ = _run(synthetic_setup, AdaptationConfig(method="fss", steps=0), episodes)
    gfss, _ = _run(synthetic_setup, AdaptationConfig(), episodes)
    print(f"1-shot novel IoU: fss {trained:.3f}, gfss {gfss:.3f}, untrained {untrained:.3f}")
    assert trained > untrained + MARGIN_FSS
    assert gfss > untrained + MARGIN_GFSS


@pytest.mark.slow
def test_distillation_preserves_base_predictions(synthetic_setup):
    _require_functional_model(synthetic_setup)
    episodes = _episodes(synthetic_setup, shots=1, num_episodes=3)
    novel_0, agree_0 = _run(synthetic_setup, AdaptationConfig(gamma=0.0), episodes)
    novel_10, agree_10 = _run(synthetic_setup, AdaptationConfig(gamma=10.0), episodes)
    print(f"gamma 0: novel {novel_0:.3f} base agreement {agree_0:.3f}; gamma 10: {novel_10:.3f} {agree_10:.3f}")
    assert agree_10 > agree_0 + MARGIN_BASE
    assert novel_10 > NOVEL_FLOOR


# Measured on the committed fixture (base mIoU 0.044; 15 1-shot episodes): novel IoU FSS 0.207, GFSS gamma 0
# 0.206, gamma 10 0.214, untrained classifier 0.067; base agreement with the pre-trained model 0.962 (gamma 0) vs
# 0.966 (gamma 10). Re-measure (printed by the two tests with `pytest -s`) after retraining the fixture.
MARGIN_FSS = 0.1
MARGIN_GFSS = 0.1
MARGIN_BASE = 0.0
NOVEL_FLOOR = 0.15


# -- the reference's options: each changes what it says and nothing else ------------------------------------------
def _unnormalised_episode(seed=0, dim=8):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, dim, 4, 4, generator=gen) * 5
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 4:10, 4:10] = 1
    base = torch.randn(3, dim, generator=gen) * 0.1
    return feats, labels, base


def test_kaiming_uniform_init_is_conv2d_default_for_the_novel_rows_only():
    feats, labels, base = _unnormalised_episode()
    dim = feats.shape[1]
    clf = adapt_gfss(feats, labels, base, config=AdaptationConfig(steps=0, novel_init="kaiming_uniform"), seeds=3)
    normal = adapt_gfss(feats, labels, base, config=AdaptationConfig(steps=0), seeds=3)
    torch.testing.assert_close(clf.weight[:3], base)  # base rows untouched
    torch.testing.assert_close(normal.weight[:3], base)
    novel = clf.novel_weight
    bound = 1 / math.sqrt(dim)
    assert float(novel.abs().max()) <= bound and float(novel.abs().max()) > 0.5 * bound
    # nn.Conv2d(dim, 1, 1)'s default initialisation draws from the same interval.
    conv = torch.nn.Conv2d(dim, 1, 1, bias=False)
    assert float(conv.weight.detach().abs().max()) <= bound
    assert not torch.allclose(novel, normal.novel_weight)  # the option changes the novel row
    again = adapt_gfss(feats, labels, base, config=AdaptationConfig(steps=0, novel_init="kaiming_uniform"), seeds=3)
    torch.testing.assert_close(again.weight, clf.weight)  # seeded


def test_normalize_features_fits_and_predicts_on_unit_feature_vectors():
    feats, labels, base = _unnormalised_episode()
    config = AdaptationConfig(steps=5, normalize_features=True)
    clf = adapt_gfss(feats, labels, base, config=config, seeds=1)
    unit = torch.nn.functional.normalize(feats, dim=1)
    # Same as adapting on features normalised by hand, with the flag off.
    by_hand = adapt_gfss(unit, labels, base, config=config.replace(normalize_features=False), seeds=1)
    torch.testing.assert_close(clf.weight, by_hand.weight)
    assert clf.normalize_features and not by_hand.normalize_features
    query = torch.randn(1, feats.shape[1], 4, 4) * 7
    torch.testing.assert_close(predict(query, clf), predict(torch.nn.functional.normalize(query, dim=1), by_hand))
    # And it does change the result (the features are far from unit norm).
    plain = adapt_gfss(feats, labels, base, config=config.replace(normalize_features=False), seeds=1)
    assert not torch.allclose(plain.weight, clf.weight)
    fss = adapt_fss(feats, labels, config=AdaptationConfig(method="fss", steps=5, normalize_features=True), seeds=1)
    fss_hand = adapt_fss(unit, labels, config=AdaptationConfig(method="fss", steps=5), seeds=1)
    torch.testing.assert_close(fss.weight, fss_hand.weight)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"lr": math.inf}, r"lr=inf .*finite"),
        ({"lr": math.nan}, r"lr=nan .*finite"),
        ({"gamma": math.nan}, r"gamma=nan .*finite"),
        ({"gamma": math.inf}, r"gamma=inf .*finite"),
        ({"init_std": math.nan}, r"init_std=nan .*finite"),
        ({"transductive_weight": -math.inf}, r"transductive_weight=-inf .*finite"),
        ({"lr": "0.1"}, r"lr='0.1' .*number"),
        ({"steps": 2.7}, r"steps=2.7 .*integer"),
        ({"steps": math.inf}, r"steps=inf .*integer"),
        ({"seed": 0.5}, r"seed=0.5 .*integer"),
        ({"steps": True}, r"steps=True .*integer"),
        ({"steps": "10"}, r"steps='10' .*integer"),
    ],
    ids=[
        "lr-inf",
        "lr-nan",
        "gamma-nan",
        "gamma-inf",
        "init_std-nan",
        "transductive_weight-inf",
        "lr-str",
        "steps-fraction",
        "steps-inf",
        "seed-fraction",
        "steps-bool",
        "steps-str",
    ],
)
def test_config_refuses_non_finite_and_non_integral_numbers(overrides, match):
    with pytest.raises(ValueError, match=match):
        AdaptationConfig(**overrides)


def test_config_accepts_integral_floats_and_numpy_numbers():
    config = AdaptationConfig(steps=20.0, lr=np.float32(0.5), seed=np.int64(3))
    assert (config.steps, config.seed) == (20, 3) and type(config.steps) is int and type(config.lr) is float
