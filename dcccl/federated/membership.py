"""A loss-threshold membership-inference attack: the math (pure functions on per-sample losses).

Whoever holds a device's uploaded copy (the cloud) guesses that a sample was among the device's training samples
when the copy's loss on it is below a threshold. Over every threshold this is a ROC curve; its area (AUC) is the
probability that a random training sample has a lower loss than a random held-out one (0.5: the copy gives nothing
away). Members and non-members are matched class by class, so that the attack cannot win by telling easy classes
from hard ones.
"""

from __future__ import annotations

import numpy as np
import torch


def loss_threshold_auc(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> float:
    """AUC of the attack "member if the loss is below t": P(loss of a non-member > loss of a member), ties counting
    half (the Mann-Whitney statistic)."""
    members = member_losses.detach().double().flatten()
    nonmembers = nonmember_losses.detach().double().flatten()
    if members.numel() == 0 or nonmembers.numel() == 0:
        raise ValueError("the attack needs at least one member and one non-member loss")
    scores = torch.cat([members, nonmembers])
    # Average ranks (1-based) with ties sharing their mean rank.
    order = torch.argsort(scores, stable=True)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    # Rank-sum of the non-members: a large one means non-members have higher losses than members.
    n_members, n_nonmembers = members.numel(), nonmembers.numel()
    rank_sum = ranks[n_members:].sum()
    u_statistic = rank_sum - n_nonmembers * (n_nonmembers + 1) / 2
    return float(u_statistic / (n_members * n_nonmembers))


def roc_points(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> tuple[list[float], list[float]]:
    """False and true positive rates of the attack at every threshold (from "nothing is a member" to "everything")."""
    members = member_losses.detach().double().flatten()
    nonmembers = nonmember_losses.detach().double().flatten()
    thresholds = torch.unique(torch.cat([members, nonmembers]))
    fpr = [0.0] + [float((nonmembers <= t).double().mean()) for t in thresholds]
    tpr = [0.0] + [float((members <= t).double().mean()) for t in thresholds]
    return fpr, tpr


def class_matched(member_labels: np.ndarray, nonmember_labels: np.ndarray, seed: int,
                  limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions of as many members as non-members of each class the members hold (drawn at random with ``seed``;
    at most ``limit`` of each in all, split across classes in proportion)."""
    rng = np.random.default_rng(seed)
    picked_members: list[np.ndarray] = []
    picked_nonmembers: list[np.ndarray] = []
    for label in np.unique(member_labels):
        mine = np.flatnonzero(member_labels == label)
        theirs = np.flatnonzero(nonmember_labels == label)
        count = min(len(mine), len(theirs))
        picked_members.append(rng.permutation(mine)[:count])
        picked_nonmembers.append(rng.permutation(theirs)[:count])
    members, nonmembers = np.concatenate(picked_members), np.concatenate(picked_nonmembers)
    if limit is not None and len(members) > limit:
        keep = np.sort(rng.permutation(len(members))[:limit])
        members, nonmembers = members[keep], nonmembers[keep]
    return np.sort(members), np.sort(nonmembers)
