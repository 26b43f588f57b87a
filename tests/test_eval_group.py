"""Heads trained as one group (the seeds and initializations of a label fraction) train exactly as they do
alone: same losses, same chosen epoch and score, same weights, also when one member stops early."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_iou

from models.evaluate.classify import linear_probe
from models.evaluate.detection import _ignored
from models.evaluate.fit import FitConfig, fit
from models.evaluate.segment import SegConfig, train_segmentation
from tests.test_eval_heads import lesion_tokens

torch.set_num_threads(1)


def _regression(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 6, generator=g)
    return x, x @ torch.randn(6, 2, generator=g) + 0.1 * torch.randn(40, 2, generator=g)


def _fit_linears(seeds: list[int], data: list[tuple[torch.Tensor, torch.Tensor]], plateau: dict[int, int]):
    """Linear members fitted on their own data; member g's validation score stops improving after epoch
    `plateau[g]` (a scripted score, so early stopping is certain), otherwise it is minus its train loss."""
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(nn.Linear(6, 2))
    epoch = dict.fromkeys(range(len(seeds)), -1)

    def batch_loss(members, batches, gens):
        # the generator is the member's own: drawing from it (as augmentation does) must not disturb the
        # others
        noise = [
            torch.randn(len(idx), 6, generator=gen) * 0.01 for idx, gen in zip(batches, gens, strict=True)
        ]
        return [
            nn.functional.mse_loss(models[g](data[g][0][idx] + eps), data[g][1][idx])
            for g, idx, eps in zip(members, batches, noise, strict=True)
        ]

    def validate(members):
        scores = []
        for g in members:
            epoch[g] += 1
            with torch.no_grad():
                own = -float(nn.functional.mse_loss(models[g](data[g][0]), data[g][1]))
            scores.append(own if epoch[g] <= plateau.get(g, 10**6) else -1e9)
        return scores

    cfg = FitConfig(
        optimizer="adamw",
        lr=0.05,
        weight_decay=0.01,
        epochs=12,
        batch_size=16,
        clip_grad=0.5,
        patience=2,
        warmup_epochs=1,
    )
    return models, fit(models, batch_loss, validate, 40, cfg, seeds, "linears")


def test_a_member_trains_the_same_alone_and_in_a_group_even_when_another_stops_early():
    seeds, data = [3, 4, 5], [_regression(s) for s in (10, 11, 12)]
    group_models, group = _fit_linears(seeds, data, plateau={1: 3})
    assert [r.epochs_run for r in group] == [12, 6, 12]  # member 1: best at epoch 3, two stale validations
    assert group[1].best_epoch == 3
    for g, seed in enumerate(seeds):
        (alone_model,), (alone,) = _fit_linears([seed], [data[g]], plateau={0: 3} if g == 1 else {})
        assert alone.losses == group[g].losses
        assert (alone.best_epoch, alone.epochs_run, alone.best_score) == (
            group[g].best_epoch,
            group[g].epochs_run,
            group[g].best_score,
        )
        assert torch.equal(alone_model.weight, group_models[g].weight)


def test_segmentation_heads_of_one_fraction_train_together_as_they_do_one_by_one():
    """Two encoders' tokens (a random one and a 5x larger one) x two seeds, the shared masks: the group of
    four gives every member's losses, chosen score and weights exactly as its run alone."""
    tokens, masks = lesion_tokens(0, n=24)
    members = [(tokens, 0), (tokens, 1), (tokens * 5 + 1, 0), (tokens * 5 + 1, 1)]
    cfg = SegConfig(channels=(8, 8, 8), token_norm=True)
    fit_cfg = FitConfig(optimizer="adamw", lr=5e-3, weight_decay=0.05, epochs=6, batch_size=8, validations=3)
    heads, group = train_segmentation(
        ([t for t, _ in members], masks),
        ([t[:8] for t, _ in members], masks[:8]),
        4,
        32,
        cfg,
        fit_cfg,
        seeds=[s for _, s in members],
    )
    assert group[0].losses != group[1].losses  # the seeds differ: another init and batch order
    for (t, seed), head, result in zip(members, heads, group, strict=True):
        (alone_head,), (alone,) = train_segmentation(
            ([t], masks), ([t[:8]], masks[:8]), 4, 32, cfg, fit_cfg, seeds=[seed]
        )
        assert alone.losses == result.losses
        assert (alone.best_score, alone.best_epoch) == (result.best_score, result.best_epoch)
        alone_state, state = alone_head.state_dict(), head.state_dict()
        assert all(torch.equal(alone_state[k], state[k]) for k in state)  # weights and BatchNorm statistics


def test_linear_probes_of_one_fraction_train_together_as_they_do_one_by_one():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(50, 8, generator=g) for _ in range(3)]
    labels = (feats[0][:, :2] > 0).float()
    cfg = FitConfig(epochs=20, batch_size=16, lr=0.5, clip_grad=None, patience=3)
    seeds = [0, 1, 2]
    heads, group = linear_probe((feats, labels), ([f[:20] for f in feats], labels[:20]), 2, True, cfg, seeds)
    for f, seed, head, result in zip(feats, seeds, heads, group, strict=True):
        (alone_head,), (alone,) = linear_probe(([f], labels), ([f[:20]], labels[:20]), 2, True, cfg, [seed])
        assert alone.losses == result.losses and alone.epochs_run == result.epochs_run
        assert torch.equal(alone_head.weight, head.weight)


def test_the_batched_ignore_rule_equals_box_iou_image_by_image():
    """`_ignored` computes every image's IoUs in one padded call; it must flag what torchvision's `box_iou`,
    image by image, flags (images without truth, and with one to three truths)."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(4, 3, 8, 8, 2, generator=g) * 60
    pred = torch.cat([xy, xy + 4 + torch.rand(4, 3, 8, 8, 2, generator=g) * 20], -1)
    boxes = []
    for m in (0, 1, 3, 2):
        corner = torch.rand(m, 2, generator=g) * 50
        boxes.append(torch.cat([corner, corner + 5 + torch.rand(m, 2, generator=g) * 15], 1))
    expected = torch.zeros(4, 3, 8, 8, dtype=torch.bool)
    for b, truth in enumerate(boxes):
        if len(truth):
            expected[b] = box_iou(pred[b].reshape(-1, 4), truth).amax(1).view(3, 8, 8) > 0.3
    assert expected.any() and not expected.all()
    assert torch.equal(_ignored(pred, boxes, 0.3), expected)
