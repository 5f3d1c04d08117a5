"""A victim's training run: what ``verify`` does for every (defense, paradigm) pair.

The training set stays on the device as uint8; each epoch is one shuffled pass of minibatches, each
batch converted to float, augmented by the defense and stepped by the defense (standard SGD by
default), with a one-cycle learning-rate schedule. Test accuracy is measured after every epoch.
What is not a plain optimiser number — a data-dependent init, the parameter groups, the loss, the
standard augmentation, test-time augmentation — comes from the run's recipe
(:mod:`ueguard.engine.recipes`; ``standard`` by default).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ueguard.data.working_set import WorkingSet
from ueguard.engine.loops import BatchSampler, Trainer, batch_ranges, predict
from ueguard.engine.progress import SILENT, Progress
from ueguard.engine.recipes import FitConfig, Recipe  # noqa: F401 (FitConfig: re-exported)
from ueguard.engine.runtime import Runtime


def accuracy(model: nn.Module, data: WorkingSet, runtime: Runtime, batch_size: int = 512, logits=None) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on clean ``data`` (already on the run's device); ``logits``:
    a recipe's test-time logits (see :func:`ueguard.engine.loops.predict`)."""
    batches = (runtime.to_float(data.images[s]) for s in batch_ranges(len(data), batch_size))
    pred = predict(model, batches, runtime, logits)
    return (pred == data.labels).float().mean().item() if len(data) else float("nan")


def can_stream(defense) -> bool:
    """Whether ``defense`` trains on batches alone: it neither transforms the whole set up front
    (``preprocess``) nor looks at it before training (``start``), so the set need not be held."""
    from ueguard.defenses.base import Defense

    return type(defense).preprocess is Defense.preprocess and type(defense).start is Defense.start


def fit(model: nn.Module, train: WorkingSet, test: WorkingSet, cfg: FitConfig, *, defense, paradigm=None,
        params=None, runtime: Runtime, generator: torch.Generator, validation: WorkingSet | None = None,
        progress: Progress = SILENT, desc: str = "training", recipe=None, test_every: int = 1) -> list[dict]:
    """Train ``model`` on ``train`` (a working set, or a ``StreamedSet`` read batch by batch when the
    defense :func:`can_stream`) under ``defense`` (and ``paradigm``: which parameters train, per-stage
    groups, frozen stages kept in eval mode) and return the per-epoch history: ``epoch``,
    ``train_loss``, ``train_accuracy`` (on the batches actually trained on), ``test_accuracy``,
    ``val_accuracy`` (with ``validation``), ``lr``, ``seconds``, plus the defense's own fields.
    A defense whose ``start`` reports something (the staged schedule's ACM before training) adds an
    epoch-0 record. The ``recipe`` (default ``standard``) inits the model from the data before training
    (for a from-scratch start), builds the optimiser's groups and loss, and gives the standard augmentation
    and the test-time logits. ``test_every``: test after every that many epochs and always after the last
    (0: the last only; an untested epoch's record has no ``test_accuracy``) — a benchmark that times a
    whole protocol pays for the tests the protocol needs, not for a curve."""
    from ueguard.defenses.base import FitState

    recipe = recipe if recipe is not None else Recipe()
    model = runtime.prepare_model(model)
    if paradigm is not None:
        params = paradigm.prepare(model)
    streamed = not isinstance(train, WorkingSet)  # a StreamedSet (ueguard.data.loaders): read batch by batch
    if streamed and not can_stream(defense):
        raise ValueError(f"defense {defense.name!r} transforms the whole training set before training; "
                         "load it into memory instead of streaming it")
    images = None if streamed else defense.preprocess(train.images, train.labels).to(runtime.device)
    labels = None if streamed else train.labels.to(runtime.device)
    test = test.to(runtime.device)  # once, not every epoch
    validation = validation.to(runtime.device) if validation is not None else None
    sampler = BatchSampler(len(train), cfg.batch_size, generator, drop_last=len(train) > cfg.batch_size)
    recipe.prepare(model, images, runtime, pretrained=paradigm is not None and paradigm.needs_pretrained)
    total_steps = cfg.epochs * sampler.steps_per_epoch()
    trainer = Trainer(model, runtime, cfg.optim(), total_steps=total_steps,
                      params=recipe.param_groups(model, params, cfg), loss=recipe.loss)
    averager = recipe.averager(model, total_steps)
    train_mode = paradigm.train_mode if paradigm is not None else nn.Module.train
    state = FitState(model, trainer, runtime, generator, images, labels, sampler.steps_per_epoch(), cfg.epochs,
                     validation)
    history, tta = [], recipe.test_logits
    extra = defense.start(state)
    if extra:
        history.append({"epoch": 0, "test_accuracy": round(accuracy(model, test, runtime, logits=tta), 5), **extra})
    step = 0
    passes = train.epochs(sampler, generator, runtime.device) if streamed else None
    with progress.bar(cfg.epochs, desc, unit="epoch") as bar:
        for epoch in range(1, cfg.epochs + 1):
            started = time.perf_counter()
            train_mode(model)
            loss_sum = torch.zeros((), device=runtime.device)
            correct = torch.zeros((), dtype=torch.long, device=runtime.device)
            seen = 0
            batches = (next(passes) if streamed else
                       ((images[idx], labels[idx]) for idx in (i.to(runtime.device) for i in sampler.epoch())))
            for batch_images, batch_labels in batches:
                x = defense.augment(runtime.to_float(batch_images), generator, recipe.augment)
                loss, hits = defense.step(trainer, x, batch_labels)
                loss_sum += loss * batch_labels.numel()
                correct += hits
                seen += batch_labels.numel()
                step += 1
                if averager is not None:
                    averager.step(step)
                defense.after_step(state, step)
            if averager is not None and epoch == cfg.epochs:
                averager.finish()
            if epoch == cfg.epochs:
                tta = recipe.final_test_logits
            record = {"epoch": epoch, "train_loss": round(loss_sum.item() / seen, 5),
                      "train_accuracy": round(correct.item() / seen, 5)}
            if epoch == cfg.epochs or (test_every and epoch % test_every == 0):
                record["test_accuracy"] = round(accuracy(model, test, runtime, logits=tta), 5)
            if validation is not None:
                record["val_accuracy"] = round(accuracy(model, validation, runtime, logits=tta), 5)
            record.update(lr=trainer.step_lrs[-1], **defense.end_epoch(state, epoch),
                          seconds=round(time.perf_counter() - started, 3))
            history.append(record)
            bar.update(1, **({"test_acc": f"{record['test_accuracy']:.3f}"} if "test_accuracy" in record else {}))
    return history
