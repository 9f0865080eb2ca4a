"""Pre-training losses against brute-force loop implementations: the sampler rules and Eq. 2 (values, gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from gfss_hf.losses import (
    contrastive_loss_from_samples,
    label_smoothed_cross_entropy,
    pixel_contrastive_loss,
    sample_contrastive_pixels,
)


def brute_force_infonce(emb, labels, temperature, background_index=0, background_anchors=False):
    """Eq. 2 written as loops over anchors, positives and negatives (float64)."""
    emb = emb.double()
    total, count = emb.sum() * 0.0, 0
    m = emb.shape[0]
    for i in range(m):
        if labels[i] == background_index and not background_anchors:
            continue
        pos = [j for j in range(m) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(m) if labels[j] != labels[i]]
        if not pos:
            continue
        neg_sum = sum((torch.exp(emb[i] @ emb[n] / temperature) for n in neg), emb.sum() * 0.0)
        li = emb.sum() * 0.0
        for p in pos:
            s = torch.exp(emb[i] @ emb[p] / temperature)
            li = li - torch.log(s / (s + neg_sum))
        total = total + li / len(pos)
        count += 1
    return total / count


def _random_samples(m=14, d=5, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, num_classes, (m,), generator=g)
    labels[:3] = torch.tensor([0, 1, 1])  # at least one anchor with a positive
    return emb, labels


@pytest.mark.parametrize("background_anchors", [False, True])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_infonce_matches_brute_force_values_and_gradients(background_anchors, temperature):
    emb, labels = _random_samples()
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    ours = contrastive_loss_from_samples(a, labels, temperature=temperature, background_anchors=background_anchors)
    ref = brute_force_infonce(b, labels, temperature, background_anchors=background_anchors)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_background_is_never_an_anchor_but_stays_a_negative():
    emb, labels = _random_samples(seed=3)
    base = contrastive_loss_from_samples(emb, labels)
    # Moving a background embedding changes the loss (it is a negative of the other anchors) ...
    moved = emb.clone()
    bg = int(torch.nonzero(labels == 0)[0])
    moved[bg] = -moved[bg]
    assert not torch.allclose(contrastive_loss_from_samples(moved, labels), base)
    # ... while with only background + one class, the anchors are that class's pixels alone.
    labels2 = torch.tensor([0, 0, 0, 1, 1])
    emb2 = F.normalize(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    ref = brute_force_infonce(emb2, labels2, 0.1)
    torch.testing.assert_close(contrastive_loss_from_samples(emb2, labels2).double(), ref, rtol=1e-5, atol=1e-6)
    # Only background sampled: no anchor, zero loss that still backpropagates.
    only_bg = emb2[:3].clone().requires_grad_(True)
    loss = contrastive_loss_from_samples(only_bg, labels2[:3])
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(only_bg.grad) == 0


def test_base_temperature_scaling_and_input_errors():
    emb, labels = _random_samples()
    plain = contrastive_loss_from_samples(emb, labels, temperature=0.1)
    scaled = contrastive_loss_from_samples(emb, labels, temperature=0.1, base_temperature=0.07)
    torch.testing.assert_close(scaled, plain * (0.1 / 0.07))
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss_from_samples(emb, labels, temperature=0.0)
    with pytest.raises(ValueError, match=r"\(M, D\)"):
        contrastive_loss_from_samples(emb, labels[:-1])


def test_no_negatives_gives_finite_loss_and_gradient():
    emb = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=1).requires_grad_(True)
    loss = contrastive_loss_from_samples(emb, torch.tensor([1, 1, 1, 1]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # exp(s)/(exp(s) + 0) = 1
    assert torch.isfinite(emb.grad).all()


def _brute_force_pools(labels, predictions, max_samples, max_views, ignore_index=255):
    """Per (image, class): the hard / easy pixel sets, n, and the expected (hard, easy) counts."""
    b = labels.shape[0]
    pairs = []
    for i in range(b):
        for c in sorted(set(labels[i].flatten().tolist())):
            if c != ignore_index and int((labels[i] == c).sum()) > max_views:
                pairs.append((i, c))
    n = min(max_samples // len(pairs), max_views)
    expected = []
    for i, c in pairs:
        lab, pred = labels[i].flatten().tolist(), predictions[i].flatten().tolist()
        hard = {k for k in range(len(lab)) if lab[k] == c and pred[k] != c}
        easy = {k for k in range(len(lab)) if lab[k] == c and pred[k] == c}
        if len(hard) >= n / 2 and len(easy) >= n / 2:
            kh = n // 2
        elif len(hard) < n / 2:
            kh = len(hard)
        else:
            kh = n - len(easy)
        expected.append((i, c, hard, easy, kh, n - kh))
    return n, expected


@pytest.mark.parametrize("max_samples,max_views", [(64, 10), (40, 12), (1024, 100)])
def test_sampler_follows_the_hard_easy_rules(max_samples, max_views):
    g = torch.Generator().manual_seed(0)
    b, h, w, d = 3, 16, 16, 6
    labels = torch.randint(0, 4, (b, h, w), generator=g)
    labels[0, :4] = 255  # ignored pixels are never sampled
    labels[1] = torch.where(labels[1] == 3, torch.full_like(labels[1], 2), labels[1])  # class 3 absent in image 1
    labels[2, :, :] = torch.where(torch.rand(h, w, generator=g) < 0.9, 1, 0)  # class 0 is small in image 2
    # Predictions: mostly right for some classes, mostly wrong for others, so both top-up branches happen.
    noise = torch.rand(b, h, w, generator=g)
    predictions = torch.where(noise < torch.tensor([0.05, 0.6, 0.97])[:, None, None], labels, (labels + 1) % 4)
    emb = torch.arange(b * h * w, dtype=torch.float64).reshape(b, 1, h, w).expand(b, d, h, w).contiguous()
    if max_views >= 100:
        labels = F.interpolate(labels[:, None].float(), size=(64, 64), mode="nearest")[:, 0].long()  # bigger map
        predictions = F.interpolate(predictions[:, None].float(), size=(64, 64), mode="nearest")[:, 0].long()
        emb = torch.arange(b * 64 * 64, dtype=torch.float64).reshape(b, 1, 64, 64).expand(b, d, 64, 64).contiguous()
        h = w = 64
    x, y = sample_contrastive_pixels(
        emb, labels, predictions, max_samples=max_samples, max_views=max_views, generator=torch.Generator()
    )
    n, expected = _brute_force_pools(labels, predictions, max_samples, max_views)
    assert x.shape == (n * len(expected), d) and y.shape == (n * len(expected),)
    ids = x[:, 0].long().tolist()  # the embedding value is the flat pixel id
    assert len(set(ids)) == len(ids), "a pixel was sampled twice"
    saw_top_up = False
    for k, (i, c, hard, easy, kh, ke) in enumerate(expected):
        chunk = ids[k * n : (k + 1) * n]
        assert y[k * n : (k + 1) * n].tolist() == [c] * n
        local = [p - i * h * w for p in chunk]
        assert all(0 <= p < h * w for p in local)
        got_hard = [p for p in local if p in hard]
        got_easy = [p for p in local if p in easy]
        assert (len(got_hard), len(got_easy)) == (kh, ke), (i, c)
        assert local == got_hard + got_easy  # hard views first
        saw_top_up |= kh != n // 2
    assert saw_top_up, "the test data should exercise the top-up rule"
    assert 255 not in y.tolist()


def test_sampler_downsamples_labels_nearest_and_uses_the_generator():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    big = labels.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)  # 32x32, exactly nearest-invertible
    emb = F.normalize(torch.randn(2, 4, 8, 8, generator=g), dim=1)
    pred = torch.randint(0, 3, (2, 8, 8), generator=g)
    a = sample_contrastive_pixels(
        emb, big, pred, max_samples=24, max_views=4, generator=torch.Generator().manual_seed(5)
    )
    b = sample_contrastive_pixels(
        emb, labels, pred, max_samples=24, max_views=4, generator=torch.Generator().manual_seed(5)
    )
    c = sample_contrastive_pixels(
        emb, labels, pred, max_samples=24, max_views=4, generator=torch.Generator().manual_seed(6)
    )
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])  # another seed draws other pixels
    # Per-image generators: image 1's draw does not depend on image 0 being in the batch.
    gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    full = sample_contrastive_pixels(emb, labels, pred, max_samples=24, max_views=4, generator=gens, num_pairs=6)
    alone = sample_contrastive_pixels(
        emb[1:],
        labels[1:],
        pred[1:],
        max_samples=24,
        max_views=4,
        generator=[torch.Generator().manual_seed(11)],
        num_pairs=6,
    )
    n_img1 = alone[0].shape[0]
    torch.testing.assert_close(full[0][-n_img1:], alone[0])
    with pytest.raises(ValueError, match="num_pairs"):
        sample_contrastive_pixels(emb, labels, pred, max_samples=24, max_views=4, num_pairs=1)
    with pytest.raises(ValueError, match="one per image"):
        sample_contrastive_pixels(emb, labels, pred, generator=[torch.Generator()])


def test_sampler_with_too_many_pairs_returns_nothing_and_the_loss_is_zero():
    emb = F.normalize(torch.randn(2, 4, 8, 8), dim=1).requires_grad_(True)
    labels = torch.randint(0, 3, (2, 8, 8))
    x, y = sample_contrastive_pixels(emb, labels, labels, max_samples=2, max_views=2, num_pairs=6)
    assert x.shape == (0, 4) and y.shape == (0,)
    loss = pixel_contrastive_loss(emb, labels, labels, max_samples=1, max_views=1)
    assert loss.item() == 0.0
    loss.backward()


def test_pixel_contrastive_loss_equals_sampler_then_loss():
    g = torch.Generator().manual_seed(2)
    emb = F.normalize(torch.randn(2, 8, 8, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (2, 32, 32), generator=g)
    pred = torch.randint(0, 3, (2, 8, 8), generator=g)
    loss = pixel_contrastive_loss(emb, labels, pred, max_samples=48, max_views=6, generator=torch.Generator())
    x, y = sample_contrastive_pixels(emb, labels, pred, max_samples=48, max_views=6, generator=torch.Generator())
    ref = brute_force_infonce(x, y, 0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert loss.item() > 0


def test_label_smoothed_cross_entropy_against_a_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3, 3), generator=g)
    labels[0, 0, 0] = 255
    eps = 0.1
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                y = int(labels[b, i, j])
                if y == 255:
                    continue
                logp = torch.log_softmax(logits[b, :, i, j], dim=0)
                q = [eps / 3] * 4
                q[y] = 1 - eps
                total = total - sum(q[c] * logp[c] for c in range(4))
                count += 1
    ref = total / count
    ours = label_smoothed_cross_entropy(logits, labels, epsilon=eps)
    torch.testing.assert_close(ours.double(), ref)
    assert math.isfinite(ours.item())
