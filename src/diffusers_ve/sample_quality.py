"""Sample quality of digits models, judged in a feature space nobody here wrote.

A scikit-learn ``MLPClassifier`` fitted on the training split of scikit-learn's digits is the judge. A sample set
is scored by

* **FD**: the Fréchet distance between Gaussians fitted to the classifier's hidden-layer activations of the
  samples and of the reference (training) digits, ``|mu_a - mu_b|^2 + tr(A + B - 2 (A B)^(1/2))``;
* **TV**: the total variation between the predicted class frequencies of the samples and the reference's, in %;
* **conf**: the classifier's mean top-class probability on the samples, in %.

Samples are scored as a pipeline returns them: clamped to the data range ``[-1, 1]``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import linalg

from . import data as ve_data

DIGITS_EVAL_FRACTION = 0.1  # the split of training/train_ve.py (seed 0, at least 8 held out): 1617 / 180
DIGITS_MIN_HELD = 8


def digits_split(resolution: int = 8):
    """(train, held-out) digits images in [-1, 1] and their labels, split as the training script splits them."""
    from sklearn.datasets import load_digits

    x = ve_data.load_digits_images(resolution).numpy()
    labels = load_digits().target
    tr, he = ve_data.split_indices(len(x), DIGITS_EVAL_FRACTION, seed=0, min_held=DIGITS_MIN_HELD)
    return x[tr], labels[tr], x[he], labels[he]


def frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
    """Fréchet distance between the Gaussians N(mu_a, cov_a) and N(mu_b, cov_b)."""
    w, v = linalg.eigh(cov_a)  # tr (A B)^(1/2) = tr (A^(1/2) B A^(1/2))^(1/2): symmetric, so eigh; robust when
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # a dead ReLU unit makes A or B singular
    cross = np.sqrt(np.clip(linalg.eigvalsh(half @ cov_b @ half), 0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


@dataclass
class Score:
    fd: float
    tv: float
    conf: float


class DigitsJudge:
    """A digits classifier fitted on the training split, and the statistics of its reference set.

    Args:
        hidden: width of the classifier's one hidden layer (the feature space of the Fréchet distance).
        seed: the classifier's initialisation seed.
        reference: images (N, 1, 8, 8) in [-1, 1] to compare against; default the training split.
    """

    def __init__(self, hidden: int = 64, seed: int = 0, reference: Optional[np.ndarray] = None):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        x_tr, y_tr, self.held_out, self.held_labels = digits_split()
        self.clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=100, random_state=seed, alpha=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.clf.fit(x_tr.reshape(len(x_tr), -1), y_tr)
        self.held_accuracy = float(self.clf.score(self.held_out.reshape(len(self.held_out), -1), self.held_labels))
        ref = x_tr if reference is None else np.asarray(reference)
        feats = self.features(ref)
        self.mu, self.cov = feats.mean(0), np.cov(feats, rowvar=False)
        self.freq = self._freq(ref)

    @staticmethod
    def _flat(images) -> np.ndarray:
        x = images.detach().cpu().double().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float64)
        if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
            raise ValueError(f"`images` must have shape (N, 1, 8, 8) (digits in [-1, 1]); got {x.shape}.")
        if not np.all(np.isfinite(x)):
            raise ValueError("`images` has non-finite values (NaN or inf).")
        return np.clip(x, -1.0, 1.0).reshape(len(x), -1)

    def features(self, images) -> np.ndarray:
        """Hidden-layer (ReLU) activations of the classifier, (N, hidden)."""
        x = self._flat(images)
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    def _freq(self, images) -> np.ndarray:
        pred = self.clf.predict(self._flat(images))
        return np.bincount(pred, minlength=10) / len(pred)

    def score(self, images) -> Score:
        """FD, class-frequency TV (%) and mean confidence (%) of a sample set (N >= 2)."""
        feats = self.features(images)
        fd = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), self.mu, self.cov)
        tv = 50.0 * float(np.abs(self._freq(images) - self.freq).sum())
        conf = 100.0 * float(self.clf.predict_proba(self._flat(images)).max(1).mean())
        return Score(fd, tv, conf)

    def bootstrap_fd(self, images, rounds: int = 20, seed: int = 0) -> float:
        """Standard deviation of the FD over bootstrap resamples of the sample set."""
        feats = self.features(images)
        rng = np.random.default_rng(seed)
        fds = []
        for _ in range(rounds):
            f = feats[rng.integers(0, len(feats), len(feats))]
            fds.append(frechet_distance(f.mean(0), np.cov(f, rowvar=False), self.mu, self.cov))
        return float(np.std(fds, ddof=1)) if rounds > 1 else math.nan

    def floor(self) -> tuple[Score, float]:
        """The score of the held-out real digits (the best a sampler can expect at that sample size) and its
        bootstrap sd."""
        return self.score(self.held_out), self.bootstrap_fd(self.held_out)


__all__ = ["DigitsJudge", "Score", "digits_split", "frechet_distance"]
