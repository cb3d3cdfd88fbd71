"""Feature Likelihood Divergence (Jiralerspong et al., NeurIPS 2023), the published algorithm of its
authors' ``fld`` package (marcojira/fld), re-implemented here (that package is not on PyPI):

1. every set is standardised with the mean and (unbiased) std of the test features;
2. at most ``GEN_SIZE`` (10,000) generated samples are kept (a seeded random subset);
3. a mixture of isotropic Gaussians centred on the generated samples, equal weights, one log-variance
   per centre, is fitted to the training features: log-variances initialised at
   ``log((min squared distance of a training point to the centre + 1e-3) / dim)``, then Adam
   (lr 0.5, batches of 10,000, at most 50 epochs, stop when the last five epoch losses differ by
   less than 5e-4, log-variances clamped to [-40, 40]) on the negative log-likelihood per dimension,
   with an extra "origin" component at the training mean (distances shrunk by 0.9^2, its own
   log-variance, weight 1) that gives every point some likelihood;
4. FLD = 100 x (NLL per dimension of the test features under that mixture - the same NLL under a
   mixture centred on a random ``min(n_gen, n_train / 2)`` training samples and fitted to the rest).
``mode="gap"`` gives 100 x (train NLL - test NLL) under the generated mixture (memorisation gap), and
:func:`memorisation_scores` the per-sample maximum log-likelihood per dimension of a training sample
under each generated sample's Gaussian. Copies of training samples score very high (the reference
warns above 1,000).
"""

from __future__ import annotations

import math

import numpy as np
import torch

GEN_SIZE = 10_000
LR = 0.5
EPOCHS = 50
BATCH = 10_000
ORIGIN_SHRINK = 0.1


def _sqdist(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, centres) ** 2


def _shuffle(x: torch.Tensor, g: torch.Generator, size: int | None = None) -> torch.Tensor:
    idx = torch.randperm(len(x), generator=g)[:size]
    return x[idx.to(x.device)]


class IsotropicMixture:
    """Equal-weight mixture of N(centre_j, exp(log_var_j) I); centres [m, d]."""

    def __init__(self, centres: torch.Tensor):
        self.centres = centres
        self.m, self.dim = centres.shape
        self.log_var = torch.zeros(self.m, device=centres.device)

    def pairwise_ll(self, sq: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        """log N(x_i | centre_j, exp(log_var_j) I) from squared distances [n, m]."""
        return -0.5 * sq / log_var.exp() - 0.5 * self.dim * log_var - 0.5 * self.dim * math.log(2 * math.pi)

    def ll(self, x: torch.Tensor, chunk: int = BATCH) -> torch.Tensor:
        """log-likelihood of each row of ``x`` [n]."""
        out = [torch.logsumexp(self.pairwise_ll(_sqdist(b, self.centres), self.log_var) - math.log(self.m), dim=1)
               for b in x.split(chunk)]
        return torch.cat(out)

    def nll_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        return -self.ll(x) / self.dim

    def fit(self, x: torch.Tensor, g: torch.Generator) -> list[float]:
        """Fit the log-variances to ``x`` (see the module docstring); returns the epoch losses."""
        x = _shuffle(x, g)
        sq = torch.cat([_sqdist(b, self.centres) for b in x.split(BATCH)])
        log_var = ((sq.min(dim=0).values + 1e-3) / self.dim).log().requires_grad_(True)
        origin_log_var = torch.zeros((), device=x.device, requires_grad=True)
        origin_sq = (1 - ORIGIN_SHRINK) ** 2 * _sqdist(x, x.mean(dim=0, keepdim=True))
        opt = torch.optim.Adam([log_var, origin_log_var], lr=LR)
        losses: list[float] = []
        for epoch in range(EPOCHS):
            batch_losses = []
            for i in range(0, len(x), BATCH):
                opt.zero_grad()
                comp = self.pairwise_ll(sq[i : i + BATCH], log_var) - math.log(self.m)
                origin = self.pairwise_ll(origin_sq[i : i + BATCH], origin_log_var)
                loss = -torch.logsumexp(torch.cat([comp, origin], dim=1), dim=1).mean() / self.dim
                loss.backward()
                opt.step()
                with torch.no_grad():
                    log_var.clamp_(-40, 40)  # identical samples would drive it to -inf
                batch_losses.append(float(loss.detach()))
            losses.append(sum(batch_losses) / len(batch_losses))
            if epoch > 5 and max(abs(losses[-1] - losses[-j]) for j in range(1, 6)) < 5e-4:
                break
        self.log_var = log_var.detach()
        return losses


def standardise(train, test, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each set minus the test mean, over the test (unbiased) standard deviation, per feature."""
    mean, std = test.mean(dim=0), test.std(dim=0)
    return (train - mean) / std, (test - mean) / std, (gen - mean) / std


def _tensors(device, *arrays):
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return [torch.as_tensor(np.array(a, np.float32), device=dev) for a in arrays]  # a copy: inputs may be read-only memory maps


def baseline_nll(train: torch.Tensor, test: torch.Tensor, size: int, g: torch.Generator) -> float:
    """NLL per dimension of ``test`` under a mixture centred on ``min(size, n_train / 2)`` random
    training samples and fitted to the others (already standardised inputs)."""
    train = _shuffle(train, g)
    k = min(size, len(train) // 2)
    mog = IsotropicMixture(train[:k])
    mog.fit(train[k:], g)
    return float(mog.nll_per_dim(test).mean())


def _fit_generated(real, fake, real_train, seed: int, device):
    """Standardised (train, test) and the mixture on the (capped) generated features fitted to train,
    plus the generator whose stream the baseline continues."""
    g = torch.Generator().manual_seed(seed)
    if real_train is None:
        perm = torch.randperm(len(real), generator=g).numpy()
        real_train, real = real[perm[: len(real) // 2]], real[perm[len(real) // 2:]]
    train, test, gen = _tensors(device, real_train, real, fake)
    if len(gen) > GEN_SIZE:
        gen = _shuffle(gen, g, GEN_SIZE)
    train, test, gen = standardise(train, test, gen)
    mog = IsotropicMixture(gen)
    mog.fit(train, g)
    return train, test, mog, g


def fld_and_gap(real: np.ndarray, fake: np.ndarray, real_train: np.ndarray | None = None, seed: int = 0,
                device=None) -> tuple[float, float]:
    """(FLD, train/test gap) from one fit of the generated mixture (see :func:`fld`)."""
    train, test, mog, g = _fit_generated(real, fake, real_train, seed, device)
    test_nll = float(mog.nll_per_dim(test).mean())
    gap = 100.0 * (float(mog.nll_per_dim(train).mean()) - test_nll)
    return 100.0 * (test_nll - baseline_nll(train, test, mog.m, g)), gap


def fld(real: np.ndarray, fake: np.ndarray, real_train: np.ndarray | None = None, seed: int = 0, device=None,
        mode: str = "test") -> float:
    """FLD of generated features ``fake`` against the test features ``real`` and the training features
    ``real_train`` (without them: a seeded half of ``real`` each). ``mode``: ``test`` (FLD) or ``gap``."""
    if mode == "test":
        return fld_and_gap(real, fake, real_train, seed, device)[0]
    if mode != "gap":
        raise ValueError(f"FLD mode {mode!r}: test or gap")
    train, test, mog, _ = _fit_generated(real, fake, real_train, seed, device)
    return 100.0 * float(mog.nll_per_dim(train).mean() - mog.nll_per_dim(test).mean())


def memorisation_scores(real_train: np.ndarray, real: np.ndarray, fake: np.ndarray, seed: int = 0, device=None) -> np.ndarray:
    """Per generated sample: the maximum log-likelihood per dimension of a training sample under its
    fitted Gaussian (higher: closer to memorised)."""
    g = torch.Generator().manual_seed(seed)
    train, test, gen = standardise(*_tensors(device, real_train, real, fake))
    mog = IsotropicMixture(gen)
    mog.fit(train, g)
    best = torch.full((len(gen),), float("-inf"), device=gen.device)
    for b in train.split(BATCH):
        best = torch.maximum(best, mog.pairwise_ll(_sqdist(b, gen), mog.log_var).max(dim=0).values)
    return (best / train.shape[1]).cpu().numpy()
