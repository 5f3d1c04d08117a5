"""The one model type ueguard trains and attacks: images in [0, 1] in, logits out.

Every model that :func:`ueguard.models.create_model` returns is a :class:`ClassifierModel`: a
:class:`Normalize` layer followed by an inner network. Normalisation lives inside the model, as
buffers, because perturbation budgets are stated in [0, 1] pixel units: an attack or a defense that
had to remember to normalise would be one forgotten call away from a budget silently multiplied by
1/std (about 4x).

The inner network follows timm's classifier interface (``forward_features``, ``forward_head(x,
pre_logits=...)``, ``get_classifier``, ``reset_classifier``, ``num_classes``), which timm models
have and ueguard's own architectures implement, so one wrapper serves both. Its parameter names are
kept exactly as the architecture's reference implementation names them (akamaster, torchvision,
timm), so published checkpoints load with no key renaming.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

StageLayout = Sequence[tuple[str, Sequence[str]]]
"""Stages from shallow to deep, each a name and the inner network's submodule paths that form it.

The layout is a contract: running the non-head stages in order is exactly the inner network's
``forward_features``, and the last stage is the classifier that ``forward_head`` applies after
global pooling.
"""


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for N×C×H×W input.

    ``mean`` and ``std`` are (C,) buffers, so they follow the model across devices and dtypes and
    are saved in its checkpoints.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(tuple(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(tuple(std), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        mean, std = ([round(v, 4) for v in t.tolist()] for t in (self.mean, self.std))
        return f"mean={mean}, std={std}"


class ClassifierModel(nn.Module):
    """An image classifier on [0, 1] inputs: ``logits = net(normalize(x))``.

    Submodules, and so the ``state_dict`` keys:

    - ``normalize.mean``, ``normalize.std``: the input normalisation, (3,) each;
    - ``net.<key>``: the inner network, its keys exactly as its reference implementation names them.

    ``stages()`` splits the network into named stages from shallow to deep (``stem``, ``layer1`` ...
    ``head``) for code that treats depths differently: freezing or slowing shallow layers, reading
    activations at a depth for feature-space objectives. It exists only for architectures with a
    known layout (ueguard's own and timm ResNets); for others it raises ``NotImplementedError``
    rather than guess.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        arch: str,
        mean: Sequence[float],
        std: Sequence[float],
        stage_layout: StageLayout | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.arch = arch
        self._stage_layout = tuple((name, tuple(paths)) for name, paths in stage_layout) if stage_layout else None

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def mean(self) -> Tensor:
        return self.normalize.mean

    @property
    def std(self) -> Tensor:
        return self.normalize.std

    @property
    def head(self) -> nn.Module:
        """The final classifier (a linear layer for every architecture ueguard builds)."""
        return self.net.get_classifier()

    def forward(self, x: Tensor) -> Tensor:
        """Logits, N×num_classes, for images N×3×H×W in [0, 1]."""
        return self.net(self.normalize(x))

    def features(self, x: Tensor) -> Tensor:
        """Pooled penultimate features, N×D: the input to the head."""
        return self.net.forward_head(self.net.forward_features(self.normalize(x)), pre_logits=True)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` stages from shallow to deep; every parameter is in exactly one.

        A stage made of several submodules (the stem: conv, bn, activation) is returned as an
        ``nn.Sequential`` over the network's own modules, so it shares their parameters.
        """
        if self._stage_layout is None:
            raise NotImplementedError(
                f"stages() needs a known stage layout, which ueguard has for its own architectures and for "
                f"timm ResNets; {self.arch!r} ({type(self.net).__name__}) has none. Use a ResNet, or add a "
                f"layout for this family in ueguard.models.factory."
            )
        return [(name, _gather(self.net, paths)) for name, paths in self._stage_layout]

    def forward_stages(self, x: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
        """Activations after each named stage, for images in [0, 1]; stops at the deepest one asked.

        Body stages give their N×C×h×w output; ``head`` gives the logits.
        """
        stages = self.stages()
        order = [name for name, _ in stages]
        wanted = set(names)
        if unknown := wanted - set(order):
            raise ValueError(f"unknown stage(s) {sorted(unknown)} for {self.arch}; stages are {order}")
        if not wanted:
            return {}
        *body, (head_name, _) = stages
        out: dict[str, Tensor] = {}
        x = self.normalize(x)
        for name, module in body:
            x = module(x)
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    return out
        out[head_name] = self.net.forward_head(x)
        return out

    def forward_features_at(self, x: Tensor, stage: str) -> Tensor:
        """Activation after one named stage (see :meth:`forward_stages`)."""
        return self.forward_stages(x, (stage,))[stage]

    def reset_head(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` classes."""
        reference = next(self.head.parameters())
        self.net.reset_classifier(num_classes)
        self.head.to(device=reference.device, dtype=reference.dtype)


def _gather(net: nn.Module, paths: Sequence[str]) -> nn.Module:
    modules = [net.get_submodule(path) for path in paths]
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)
