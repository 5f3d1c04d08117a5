"""Pseudo-labels from a pretrained surrogate: features → k-means (scikit-learn), k given or chosen.

Used by ``protect --labels auto`` on folders without class subfolders (so label-needing methods work
on unlabeled photos) and by UC, whose clusters *are* its labels. The features are the surrogate's
pooled penultimate activations (``ClassifierModel.features``) of the clean working images; a prior
that has learned semantics groups them by content, a random network would group them by colour.

Choosing k (when not given): k-means for every k in ``k_range`` (default 2–10, capped at N − 1), and
the k with the highest silhouette score (mean over samples of (b − a)/max(a, b), a = mean distance
to the own cluster, b = to the nearest other one; computed on at most 2,000 samples) wins. The
scores of every k are returned so the choice can be audited in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ueguard.engine.runtime import Runtime

#: k values tried by default when k is not given.
DEFAULT_K_RANGE = (2, 10)


@dataclass
class Clustering:
    """Cluster index per sample, centres (in the clustered feature space), and how k was chosen."""

    labels: torch.Tensor
    centres: torch.Tensor
    k: int
    chosen_by: str
    silhouette: dict[int, float] = field(default_factory=dict)

    def record(self) -> dict:
        return {"clusters": self.k, "chosen_by": self.chosen_by,
                "silhouette": {str(k): round(v, 4) for k, v in self.silhouette.items()},
                "cluster_sizes": torch.bincount(self.labels, minlength=self.k).tolist()}


@torch.no_grad()
def surrogate_features(model: nn.Module, images_u8: torch.Tensor, runtime: Runtime, batch_size: int = 256) -> torch.Tensor:
    """Pooled penultimate features of uint8 images, ``N×D`` float32 on the CPU (eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, images_u8.shape[0], batch_size):
        with runtime.autocast():
            out.append(model.features(runtime.to_float(images_u8[start:start + batch_size])).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def kmeans(features: torch.Tensor, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans

    fit = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features.double().numpy())
    return fit.labels_.astype(np.int64), fit.cluster_centers_.astype(np.float32)


def cluster_features(features: torch.Tensor, k: int | None = None, *, seed: int = 0,
                     k_range: tuple[int, int] = DEFAULT_K_RANGE) -> Clustering:
    """k-means of ``features`` into ``k`` clusters, or into the silhouette-best k of ``k_range``."""
    from sklearn.metrics import silhouette_score

    n = features.shape[0]
    if k is not None:
        if not 1 <= k <= n:
            raise ValueError(f"cannot make {k} clusters of {n} images: the number of clusters must be in 1..{n}")
        labels, centres = kmeans(features, k, seed)
        return Clustering(torch.from_numpy(labels), torch.from_numpy(centres), k, "given")
    if n < 3:
        raise ValueError(f"choosing the number of clusters needs at least 3 images, got {n}; give it explicitly (--clusters)")
    low, high = k_range[0], min(k_range[1], n - 1)
    if low > high:
        raise ValueError(f"no k in {k_range} fits {n} images; give the number of clusters explicitly (--clusters)")
    scores, fits = {}, {}
    data = features.double().numpy()
    for k_try in range(low, high + 1):
        labels, centres = kmeans(features, k_try, seed)
        fits[k_try] = (labels, centres)
        if len(np.unique(labels)) < 2:
            continue
        scores[k_try] = float(silhouette_score(data, labels, sample_size=min(n, 2000), random_state=seed))
    if not scores:
        raise ValueError("the surrogate's features of these images are all identical, so they cannot be clustered")
    best = max(scores, key=lambda k_: (scores[k_], -k_))
    labels, centres = fits[best]
    return Clustering(torch.from_numpy(labels), torch.from_numpy(centres), best, "silhouette", scores)


def pseudo_labels(model: nn.Module, images_u8: torch.Tensor, runtime: Runtime, k: int | None = None, *,
                  seed: int = 0, k_range: tuple[int, int] = DEFAULT_K_RANGE, normalize: bool = True) -> Clustering:
    """Cluster the surrogate's features of ``images_u8`` (L2-normalised first when ``normalize``, i.e.
    k-means by cosine similarity, the usual geometry of deep features)."""
    features = surrogate_features(runtime.prepare_model(model), images_u8, runtime)
    if normalize:
        features = torch.nn.functional.normalize(features, dim=1)
    return cluster_features(features, k, seed=seed, k_range=k_range)
