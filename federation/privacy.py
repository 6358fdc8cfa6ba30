"""Differential privacy for FedAvg: DP-FedAvg's clip-and-noise step and its privacy accountant.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models") gives user-level differential privacy: whatever one client's data, the global
model could almost as well have come from a run without that client. Each round

    Δ_k = clip(w_k - w, C)                      every update scaled to L2 norm <= C
    w' = w + (Σ_k Δ_k + N(0, σ²C²·I)) / m       m = clients sampled this round

so one client moves the sum by at most C, and Gaussian noise of standard deviation σ·C
hides that move. The privacy accountant turns σ, the sampling rate q and the number of
rounds into (ε, δ): the guarantee after those rounds.

Flower has this as `DifferentialPrivacyServerSideFixedClipping`, and we do not use it
here, for three reasons found in its source (flwr 1.41; unchanged in 1.42): it drops the whole round if any
client failed (this server saves a round with the clients that answered); it draws its
noise from NumPy's global, unseeded generator (runs and resumes here are reproducible bit
for bit); and it averages the clipped models with FedAvg's example weights while sizing
the noise for an equal 1/m share each, which holds only when every shard has the same
size. The accountant is Google's `dp-accounting`: its privacy-loss-distribution (PLD)
accountant for the ε we report (Koskela et al. 2020; Doroshenko et al. 2022, "Connect the
Dots"), which is numerically tight, and its Rényi-DP accountant (Mironov 2017) beside it as
a cross-check, a looser upper bound of the same guarantee.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp

from federation.aggregation import Arrays, global_norm

# Rényi orders the accountant optimises over. Integer orders only: dp-accounting's
# fractional orders below 2 fail to converge for sampled Gaussians and log warnings.
RDP_ORDERS = tuple(range(2, 257)) + (512, 1024)
# The accountants `epsilon` knows: "pld" is the one reported as metrics.json's `epsilon`,
# "rdp" its cross-check `epsilon_rdp`.
ACCOUNTANTS = ("pld", "rdp")
# The PLD accountant's grid step, as a fraction of the RDP ε of the same run. dp-accounting's
# default (1e-4, absolute) takes 1-3 s for 30 sampled rounds and, for a tiny σ whose privacy
# loss spans thousands, more memory than a laptop has. Its discretization is pessimistic (a
# coarser grid only raises ε), and a step of ε_RDP / 1000 moved ε by at most 0.1% against
# 1e-4 in every case we measured (σ 0.01-2, q 0.01-1, 5-300 rounds) in 0.01-0.25 s.
PLD_GRID_FRACTION = 1e-3


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """The settings of DP-FedAvg: noise multiplier σ, clipping norm C, target δ."""

    noise_multiplier: float
    clipping_norm: float
    delta: float = 1e-5

    def problem(self) -> str | None:
        """Why these settings are invalid (one line, naming the flag), or None."""
        if not self.noise_multiplier >= 0:
            return f"dp-noise-multiplier must be >= 0, got {self.noise_multiplier}"
        if not self.clipping_norm > 0:
            return f"dp-clipping-norm must be > 0, got {self.clipping_norm}"
        if not 0 < self.delta < 1:
            return f"dp-delta must be in (0, 1), got {self.delta}"
        return None

    def noise_std(self, num_sampled: int) -> float:
        """Standard deviation of the noise on the average of num_sampled clipped updates."""
        return self.noise_multiplier * self.clipping_norm / num_sampled


def clip(update: Arrays, clipping_norm: float) -> tuple[Arrays, float]:
    """(update scaled to L2 norm <= clipping_norm, in float64; the norm before clipping).

    An update already inside the ball is returned unchanged (in float64).
    """
    norm = global_norm(update)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return [np.asarray(u, np.float64) * scale for u in update], norm


def dp_fedavg(global_arrays: Arrays, client_arrays: Sequence[Arrays], config: DPConfig,
              num_sampled: int, rng: np.random.Generator) -> tuple[Arrays, list[float]]:
    """One DP-FedAvg step: (new global model as float32, each update's norm before clipping).

    client_arrays are the clients' models (in a fixed order: the sum is taken in float64
    in that order). The sum is divided by num_sampled, the clients asked this round, not
    by those who answered: that fixed denominator keeps one client's share at most C/m,
    which the noise is sized for, also when someone drops out.
    """
    if not client_arrays or num_sampled < len(client_arrays):
        raise ValueError(f"dp_fedavg needs 1..num_sampled ({num_sampled}) updates, "
                         f"got {len(client_arrays)}")
    total = [np.zeros(g.shape, np.float64) for g in global_arrays]
    norms = []
    for arrays in client_arrays:
        delta, norm = clip([np.asarray(a, np.float64) - g for a, g in
                            zip(arrays, global_arrays, strict=True)], config.clipping_norm)
        norms.append(norm)
        for acc, d in zip(total, delta):
            acc += d
    return noised_average(global_arrays, total, config, num_sampled, rng), norms


def noised_average(global_arrays: Arrays, clipped_sum: Arrays, config: DPConfig,
                   num_sampled: int, rng: np.random.Generator) -> Arrays:
    """DP-FedAvg's server step from the sum of the clipped updates Σ_k Δ_k (float64):
    w + (Σ_k Δ_k + N(0, σ²C²·I)) / m, as float32.

    dp_fedavg clips and sums on the server; under SecAgg+ the clients clip and the server
    gets only the sum (secure_aggregation.py): both end here, with the same noise draws.
    """
    std = config.noise_multiplier * config.clipping_norm
    new = []
    for g, acc in zip(global_arrays, clipped_sum, strict=True):
        noise = rng.normal(0.0, std, g.shape) if std > 0 else 0.0
        new.append((np.asarray(g, np.float64) + (acc + noise) / num_sampled).astype(np.float32))
    return new


def round_event(noise_multiplier: float, sampling_rate: float) -> dp_accounting.DpEvent:
    """One round of DP-FedAvg as dp-accounting's event: a Gaussian mechanism with noise
    multiplier σ on a Poisson sample of the clients with rate q.

    This server samples a fixed number of clients (q = sampled / total); as in McMahan et
    al. 2018, the accountants treat that as Poisson sampling with the same q. For q = 1
    (every client, every round) it is exact.
    """
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    return event


@functools.lru_cache(maxsize=256)  # the server asks for the same (σ, q, rounds, δ) again
def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float,
            accountant: str = "pld") -> float:
    """ε after `rounds` rounds of DP-FedAvg at δ, by dp-accounting's `accountant`.

    "pld" (the default, the ε reported) composes the privacy-loss distribution numerically:
    tight up to its grid, which errs upwards. "rdp" is the Rényi-DP bound: valid, looser.
    inf when σ = 0; ValueError (one line) for an unknown accountant.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; known: {', '.join(ACCOUNTANTS)}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = round_event(noise_multiplier, sampling_rate)
    bound = rdp.RdpAccountant(orders=RDP_ORDERS).compose(event, rounds).get_epsilon(delta)
    if accountant == "rdp" or not math.isfinite(bound):
        return float(bound)
    tight = pld.PLDAccountant(value_discretization_interval=PLD_GRID_FRACTION * bound)
    return float(tight.compose(event, rounds).get_epsilon(delta))


def spent(config: DPConfig, sampling_rate: float, rounds: int) -> dict[str, float]:
    """What a round's record holds about privacy: {"epsilon": PLD ε, "epsilon_rdp": RDP ε}."""
    return {"epsilon": epsilon(config.noise_multiplier, sampling_rate, rounds, config.delta),
            "epsilon_rdp": epsilon(config.noise_multiplier, sampling_rate, rounds,
                                   config.delta, "rdp")}
