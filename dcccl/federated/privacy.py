"""Differential privacy of the devices' training: DP-SGD settings and the privacy a device has spent.

A device trains its copy of the co-submodel with DP-SGD (Opacus): every sample's gradient is clipped to
``max_grad_norm``, Gaussian noise of ``noise_multiplier * max_grad_norm`` is added to each batch's sum, and batches are
drawn by Poisson sampling. Only the co-submodel trains, so only its gradients are privatised; the control model runs
under ``no_grad``. Each device keeps its own accountant across the rounds it takes part in (its history stays on the
device with the rest of its state); the epsilon it reports is the accountant's for every step it took so far.

With ``target_epsilon`` each device gets the noise that keeps the most steps it may take in ``rounds`` rounds within
the target: the cap is known before training because a device's budget ends at a fixed floor or cap. Opacus is the
optional extra ``dcccl[privacy]``; it is imported only when a run asks for privacy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

from torch import nn

from dcccl.errors import ConfigError

Accountant = Literal["rdp", "prv"]
# One entry of an accountant's history: (noise multiplier, sample rate, steps).
HistoryEntry = tuple[float, float, int]


def require_opacus() -> None:
    """Refuse a run that asks for privacy when Opacus is not installed."""
    try:
        import opacus  # noqa: F401
    except ImportError as err:
        raise ConfigError("DP-SGD needs Opacus, which is not installed: pip install 'dcccl[privacy]'") from err


@dataclass(frozen=True)
class DifferentialPrivacy:
    """DP-SGD for every device's training (give ``target_epsilon`` or ``noise_multiplier``, not both).

    Args:
        target_epsilon: The epsilon a device may spend over the whole run; each device gets the noise that keeps
            the most steps it may take within it.
        noise_multiplier: The noise's standard deviation relative to ``max_grad_norm`` (instead of a target).
        delta: The delta of (epsilon, delta)-DP; keep it below one over a device's sample count.
        max_grad_norm: Each sample's gradient is clipped to this L2 norm.
        accountant: Opacus' accountant: ``rdp`` (Rényi DP) or ``prv`` (privacy random variables, tighter).
        rounds: How many rounds the target must cover (the pipeline sets its own number of rounds).
    """

    target_epsilon: Optional[float] = None
    noise_multiplier: Optional[float] = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Accountant = "rdp"
    rounds: int = 1

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError("privacy needs exactly one of target_epsilon and noise_multiplier, got "
                              f"target_epsilon={self.target_epsilon}, noise_multiplier={self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError(f"privacy.target_epsilon must be positive, got {self.target_epsilon}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"privacy.noise_multiplier must be positive, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must lie in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"privacy.max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"privacy.accountant must be 'rdp' or 'prv', got {self.accountant!r}")
        if self.rounds < 1:
            raise ConfigError(f"privacy.rounds must be at least 1, got {self.rounds}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, as a config file would give it."""
        return asdict(self)

    def noise_for(self, sample_rate: float, steps_per_round: Optional[int]) -> float:
        """The noise multiplier of a device that samples batches at ``sample_rate`` and takes at most
        ``steps_per_round`` steps in each of :attr:`rounds` rounds.

        Raises:
            ConfigError: With a target epsilon but no cap on a round's steps.
        """
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        if steps_per_round is None:
            raise ConfigError("privacy.target_epsilon needs a cap on a device's steps per round (a budget without "
                              "monitor, or max_epochs/max_steps): give one, or give privacy.noise_multiplier instead")
        from opacus.accountants.utils import get_noise_multiplier

        return float(get_noise_multiplier(target_epsilon=self.target_epsilon, target_delta=self.delta,
                                          sample_rate=sample_rate, steps=steps_per_round * self.rounds,
                                          accountant=self.accountant))


def epsilon_spent(history: Sequence[Sequence[float]], delta: float, accountant: Accountant = "rdp") -> float:
    """The epsilon Opacus' accountant gives for ``history`` (``(noise multiplier, sample rate, steps)`` entries)."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    counter = create_accountant(accountant)
    counter.history = [(float(sigma), float(rate), int(steps)) for sigma, rate, steps in history]
    return float(counter.get_epsilon(delta=delta))


def check_trainable(network: nn.Module, where: str) -> None:
    """Refuse a co-submodel DP-SGD cannot train sample by sample (batch norm mixes the samples of a batch).

    Raises:
        ConfigError: Naming the layers and what to change.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(network, strict=False)
    if errors:
        kinds = sorted({type(error).__name__ for error in errors})
        first = "; ".join(str(error) for error in errors[:2])
        raise ConfigError(
            f"DP-SGD cannot train the co-submodel of {where} ({', '.join(kinds)}: {first}): build it without batch "
            "norm, e.g. co_backbone kwargs {norm: group} for small_cnn (configs/privacy.yaml does), or a timm model "
            "with norm_layer=groupnorm")


def round_step_cap(min_epochs: int, min_steps: int, monitored: bool, max_epochs: float, max_steps: float,
                   batches_per_epoch: int) -> Optional[int]:
    """The most optimizer steps a device may take in one round (``None``: no cap).

    A budget without a monitor stops at the first epoch's end where both floors hold; one with a monitor may run to
    its caps. ``max_epochs``/``max_steps`` are the tighter of the budget's and the trainer's caps (``inf``: none).
    """
    floor_epochs = max(min_epochs, 1, math.ceil(min_steps / batches_per_epoch))
    epochs = min(float(floor_epochs), max_epochs) if not monitored else max_epochs
    cap = min(epochs * batches_per_epoch, max_steps)
    return None if math.isinf(cap) else int(cap)


class PrivateTraining:
    """One device's DP-SGD for one round: Opacus' engine around its co-submodel, optimizer and loader.

    The engine's accountant starts from ``history`` (the device's earlier rounds), so :meth:`epsilon` is what the
    device has spent over the whole run. Batches are drawn by Poisson sampling at rate ``1 / len(loader)``.

    Args:
        settings: The run's privacy settings.
        history: The device's accountant history from its earlier rounds.
        network: The co-submodel (it trains in place; :meth:`close` hands it back unwrapped).
        optimizer: Its optimizer.
        loader: The device's training batches.
        steps_per_round: The most steps the device may take in a round (for a target epsilon).
    """

    def __init__(self, settings: DifferentialPrivacy, history: Sequence[Sequence[float]], network: nn.Module,
                 optimizer: Any, loader: Any, steps_per_round: Optional[int]) -> None:
        from opacus import PrivacyEngine

        self.settings = settings
        self.sample_rate = 1.0 / len(loader)
        self.noise_multiplier = settings.noise_for(self.sample_rate, steps_per_round)
        for layer in network.modules():  # Opacus' hooks see activations an in-place layer would overwrite
            if getattr(layer, "inplace", False):
                layer.inplace = False  # type: ignore[assignment]
        self.engine = PrivacyEngine(accountant=settings.accountant)
        self.engine.accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
        self.network, self.optimizer, self.loader = self.engine.make_private(
            module=network, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
            max_grad_norm=settings.max_grad_norm, poisson_sampling=True)

    @property
    def history(self) -> list[HistoryEntry]:
        """The accountant's history: the earlier rounds' and this round's steps."""
        return [(float(s), float(q), int(n)) for s, q, n in self.engine.accountant.history]

    def epsilon(self) -> float:
        """The epsilon spent so far (over every round), at the settings' delta."""
        return float(self.engine.get_epsilon(self.settings.delta))

    def close(self) -> nn.Module:
        """Remove Opacus' hooks; returns the plain co-submodel."""
        self.network.remove_hooks()  # type: ignore[operator]
        plain = self.network._module
        for parameter in plain.parameters():
            parameter.grad_sample = None  # type: ignore[attr-defined]
        return plain  # type: ignore[no-any-return]

    def report(self) -> dict[str, Any]:
        """What the device records (and reports up): its epsilon, delta, noise and sample rate, and its history."""
        return {"epsilon": self.epsilon(), "delta": self.settings.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "max_grad_norm": self.settings.max_grad_norm,
                "accountant": self.settings.accountant, "history": self.history}
