"""The membership-inference attack: its AUC is the Mann-Whitney statistic (sklearn's ROC AUC), members and
non-members are matched class by class, and it finds a copy that memorised its samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dcccl.commands.audit import per_sample_losses
from dcccl.federated.membership import class_matched, loss_threshold_auc, roc_points


def test_the_auc_is_sklearn_s_roc_auc_of_low_loss_meaning_member() -> None:
    generator = torch.Generator().manual_seed(0)
    members = torch.rand(300, generator=generator)
    nonmembers = torch.rand(200, generator=generator) + 0.2
    nonmembers[:20] = members[:20]  # ties count half
    labels = np.r_[np.ones(300), np.zeros(200)]
    expected = roc_auc_score(labels, -torch.cat([members, nonmembers]).numpy())
    assert loss_threshold_auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)
    assert loss_threshold_auc(torch.zeros(5), torch.ones(5)) == 1.0
    assert loss_threshold_auc(torch.ones(5), torch.ones(5)) == 0.5
    fpr, tpr = roc_points(members, nonmembers)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError):
        loss_threshold_auc(torch.zeros(0), torch.ones(3))


def test_members_and_non_members_are_matched_class_by_class() -> None:
    member_labels = np.array([0] * 50 + [1] * 10 + [2] * 5)
    pool_labels = np.array([0] * 8 + [1] * 30 + [3] * 40)
    mine, theirs = class_matched(member_labels, pool_labels, seed=0)
    assert np.bincount(member_labels[mine], minlength=4).tolist() == [8, 10, 0, 0]
    assert np.bincount(pool_labels[theirs], minlength=4).tolist() == [8, 10, 0, 0]
    limited_mine, limited_theirs = class_matched(member_labels, pool_labels, seed=0, limit=9)
    assert len(limited_mine) == len(limited_theirs) == 9
    assert sorted(member_labels[limited_mine]) == sorted(pool_labels[limited_theirs])
    again = class_matched(member_labels, pool_labels, seed=0, limit=9)
    assert all(np.array_equal(a, b) for a, b in zip(again, (limited_mine, limited_theirs)))


def test_the_attack_finds_a_copy_that_memorised_its_samples() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(120, 16), torch.randint(0, 3, (120,))  # random labels: only memorising fits them
    members, nonmembers = TensorDataset(x[:60], y[:60]), TensorDataset(x[60:], y[60:])
    guide = nn.Linear(16, 3)
    copy = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 3))
    optimizer = torch.optim.Adam(copy.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        with torch.no_grad():
            guided = guide(x[:60])
        nn.functional.cross_entropy(guided + copy(x[:60]), y[:60]).backward()
        optimizer.step()
    member_losses, member_labels = per_sample_losses(copy, guide, DataLoader(members, batch_size=32))
    pool_losses, pool_labels = per_sample_losses(copy, guide, DataLoader(nonmembers, batch_size=32))
    assert member_labels.tolist() == y[:60].tolist()
    mine, theirs = class_matched(member_labels, pool_labels, seed=1)
    assert loss_threshold_auc(member_losses[mine], pool_losses[theirs]) > 0.95
    fresh = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 3))
    member_losses, _ = per_sample_losses(fresh, guide, DataLoader(members, batch_size=32))
    pool_losses, _ = per_sample_losses(fresh, guide, DataLoader(nonmembers, batch_size=32))
    assert abs(loss_threshold_auc(member_losses[mine], pool_losses[theirs]) - 0.5) < 0.2
