import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gfss_hf.metrics import PooledIoU, gfss_summary, harmonic_mean

METRIC_DIR = Path(__file__).resolve().parents[1] / "gfss_hf" / "evaluate_metrics" / "gfss_miou"
NUM_CLASSES = 6  # background, base 1..3, novel 4..5


def random_episodes(seed: int, num: int = 12, size: int = 9):
    """Label maps with ignore pixels, where class 5 appears in a few episodes only and class 3 never in labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (num, size, size), generator=gen)
    labels[labels == 3] = 0
    labels[torch.rand(num, size, size, generator=gen) < 0.15] = 255
    labels[: num // 3][torch.rand(num // 3, size, size, generator=gen) < 0.3] = 5
    preds = labels.clone()
    noise = torch.rand(num, size, size, generator=gen) < 0.4
    preds[noise] = torch.randint(0, 4, (int(noise.sum()),), generator=gen)  # class 3 predicted, never labelled
    preds[preds == 255] = torch.randint(0, NUM_CLASSES, (int((preds == 255).sum()),), generator=gen)
    return preds, labels


def brute_force(preds, labels, ignore=255):
    """Explicit loops: pooled per-class I and U, and per-episode IoUs."""
    inter = [0] * NUM_CLASSES
    union = [0] * NUM_CLASSES
    per_episode = {c: [] for c in range(NUM_CLASSES)}
    for p, t in zip(preds.tolist(), labels.tolist()):
        ep_i = [0] * NUM_CLASSES
        ep_u = [0] * NUM_CLASSES
        for prow, trow in zip(p, t):
            for pv, tv in zip(prow, trow):
                if tv == ignore:
                    continue
                for c in range(NUM_CLASSES):
                    ep_i[c] += int(pv == c and tv == c)
                    ep_u[c] += int(pv == c or tv == c)
        for c in range(NUM_CLASSES):
            inter[c] += ep_i[c]
            union[c] += ep_u[c]
            if ep_u[c]:
                per_episode[c].append(ep_i[c] / ep_u[c])
    return inter, union, per_episode


def fb_brute_force(preds, labels, ignore=255, foreground=None):
    valid = labels != ignore
    fg_label = labels > 0 if foreground is None else torch.isin(labels, torch.tensor(foreground))
    fg_pred = preds > 0 if foreground is None else torch.isin(preds, torch.tensor(foreground))
    fg_t, fg_p = fg_label & valid, fg_pred & valid
    bg_t, bg_p = ~fg_label & valid, ~fg_pred & valid
    fg = (fg_t & fg_p).sum().item() / (fg_t | fg_p).sum().item()
    bg = (bg_t & bg_p).sum().item() / (bg_t | bg_p).sum().item()
    return (fg + bg) / 2


def test_pooled_values_match_brute_force():
    preds, labels = random_episodes(0)
    metric = PooledIoU(NUM_CLASSES)
    metric.update(preds[:5], labels[:5])
    for e in range(5, len(preds)):
        metric.update(preds[e], labels[e])  # (H, W) updates are one episode each
    inter, union, per_episode = brute_force(preds, labels)
    assert metric.intersection.tolist() == inter
    assert metric.union.tolist() == union
    iou = metric.iou()
    for c in range(NUM_CLASSES):
        assert iou[c].item() == pytest.approx(inter[c] / union[c])
    assert int(metric.num_updates) == len(preds)
    # Class 3 is predicted but never labelled: IoU 0, and it counts in the mean.
    assert iou[3].item() == 0.0 and union[3] > 0
    expected = sum(inter[c] / union[c] for c in (1, 2, 3)) / 3
    assert metric.mean_iou([1, 2, 3]) == pytest.approx(expected)
    expected_episode = np.mean([np.mean(per_episode[c]) for c in (4, 5)])
    assert metric.episode_mean_iou([4, 5]) == pytest.approx(expected_episode, abs=1e-11)
    assert metric.fb_iou() == pytest.approx(fb_brute_force(preds, labels))
    # "Novel vs. rest": base predictions count as background.
    assert metric.fb_iou([4, 5]) == pytest.approx(fb_brute_force(preds, labels, foreground=[4, 5]))
    assert metric.fb_iou([4, 5]) != pytest.approx(metric.fb_iou())


def test_class_never_seen_is_skipped_not_zero():
    metric = PooledIoU(4)
    metric.update(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 0]]))
    assert math.isnan(metric.iou()[3].item())
    assert metric.mean_iou([1, 3]) == pytest.approx(0.5)
    assert math.isnan(metric.mean_iou([3]))


def test_pooled_differs_from_mean_of_episode_ious():
    # Episode 1: a large object segmented well; episode 2: a tiny object missed. Pooled IoU weighs pixels, the
    # per-episode mean weighs episodes.
    labels = torch.zeros(2, 10, 10, dtype=torch.long)
    labels[0, :8] = 1
    labels[1, 0, 0] = 1
    preds = labels.clone()
    preds[1, 0, 0] = 0
    metric = PooledIoU(2)
    metric.update(preds, labels)
    assert metric.iou()[1].item() == pytest.approx(80 / 81)
    assert metric.episode_mean_iou([1]) == pytest.approx(0.5)
    assert metric.mean_iou([1]) != pytest.approx(metric.episode_mean_iou([1]))


def test_merge_of_halves_equals_whole_and_is_exact():
    preds, labels = random_episodes(1, num=16)
    whole = PooledIoU(NUM_CLASSES)
    whole.update(preds, labels)
    first, second = PooledIoU(NUM_CLASSES), PooledIoU(NUM_CLASSES)
    first.update(preds[::2], labels[::2])
    second.update(preds[1::2], labels[1::2])
    merged = first.copy().merge(second)
    assert torch.equal(merged.confusion, whole.confusion)
    assert torch.equal(merged.episode_iou_sum, whole.episode_iou_sum)
    assert merged.mean_iou() == whole.mean_iou()
    assert merged.episode_mean_iou() == whole.episode_mean_iou()  # fixed point: bit-identical in any order
    assert (second + first).state_dict() == whole.state_dict()
    # The copy was independent: `first` is unchanged.
    assert int(first.num_updates) == 8
    with pytest.raises(ValueError, match="label space"):
        first.merge(PooledIoU(NUM_CLASSES + 1))


def test_reduce_sums_over_processes_with_an_accelerator():
    class FakeAccelerator:
        """Two processes whose other rank holds `other`."""

        num_processes = 2

        def __init__(self, other):
            self.other = other

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor + self.other._flat()

    preds, labels = random_episodes(2)
    a, b, whole = PooledIoU(NUM_CLASSES), PooledIoU(NUM_CLASSES), PooledIoU(NUM_CLASSES)
    a.update(preds[:4], labels[:4])
    b.update(preds[4:], labels[4:])
    whole.update(preds, labels)
    a.reduce(FakeAccelerator(b))
    assert a.state_dict() == whole.state_dict()
    # No process group and no accelerator: a no-op.
    assert b.copy().reduce().state_dict() == b.state_dict()
    assert PooledIoU.from_state_dict(whole.state_dict()).state_dict() == whole.state_dict()


def test_gfss_conventions():
    iou = torch.tensor([0.9, 0.6, 0.4, float("nan"), 0.2, 0.3], dtype=torch.float64)
    diam = gfss_summary(iou, base_classes=[1, 2, 3], novel_classes=[4, 5], convention="diam")
    assert diam["base"] == pytest.approx(0.5)  # background excluded, class 3 never occurred
    assert diam["novel"] == pytest.approx(0.25)
    assert diam["mean"] == pytest.approx(0.375)
    assert diam["harmonic"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert "total" not in diam
    capl = gfss_summary(iou, base_classes=[1, 2, 3], novel_classes=[4, 5], convention="capl")
    assert capl["base"] == pytest.approx((0.9 + 0.6 + 0.4) / 3)  # background included
    assert capl["total"] == pytest.approx((0.9 + 0.6 + 0.4 + 0.2 + 0.3) / 5)
    assert harmonic_mean(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="convention"):
        gfss_summary(iou, [1], [4], convention="pascal")
    with pytest.raises(ValueError, match="background_index"):
        gfss_summary(iou, [0, 1], [4])


def test_errors_name_the_bad_value():
    metric = PooledIoU(3)
    with pytest.raises(ValueError, match="value 7"):
        metric.update(torch.tensor([[0, 7]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax"):
        metric.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index"):
        PooledIoU(3, ignore_index=1)


@pytest.mark.parametrize("convention", ["diam", "capl"])
def test_evaluate_module_gives_the_same_numbers(tmp_path, monkeypatch, convention):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    module = evaluate.load(str(METRIC_DIR), experiment_id=f"test-{convention}", cache_dir=str(tmp_path))
    preds, labels = random_episodes(3)
    metric = PooledIoU(NUM_CLASSES)
    metric.update(preds, labels)
    out = module.compute(
        predictions=preds.numpy(),
        references=labels.numpy(),
        num_labels=NUM_CLASSES,
        base_classes=[1, 2, 3],
        novel_classes=[4, 5],
        convention=convention,
    )
    assert out["intersection"] == metric.intersection.tolist()
    assert out["union"] == metric.union.tolist()
    assert out["mean_iou"] == pytest.approx(metric.mean_iou())
    assert out["episode_mean_iou"] == pytest.approx(metric.episode_mean_iou(), abs=1e-11)
    assert out["fb_iou"] == pytest.approx(metric.fb_iou())
    summary = metric.summary([1, 2, 3], [4, 5], convention=convention)
    for key, value in summary.items():
        assert out[key] == pytest.approx(value)
