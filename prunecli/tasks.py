"""Labelled text tasks for encoders: load a jsonl, add a classifier, fine-tune, evaluate.

Encoder users prune for a task (classification, ranking), so their quality measure is task
accuracy, not perplexity. This module holds the task side of encoder pruning:

* :func:`load_task` reads a labelled ``.jsonl`` file (one JSON object per line, a text field
  and a label field) into padded token ids;
* :func:`as_classifier` turns a bare encoder (``BertModel``, ``RobertaModel``) into its
  ``<Family>ForSequenceClassification`` sharing the same weights (a classifier that is saved
  with the encoder and loads with ``AutoModelForSequenceClassification``);
* :func:`finetune` runs a short AdamW fine-tuning on the task's cross-entropy (plus an optional
  auxiliary loss, which SHRP's router uses);
* :func:`evaluate_task` measures accuracy, macro-F1 and examples/s.

Example:
    >>> from prunecli.models import load_model                               # doctest: +SKIP
    >>> lm = load_model("all-minilm-l6-v2")                                   # doctest: +SKIP
    >>> train = load_task("train.jsonl", lm.tokenizer, text_field="review", label_field="score")  # doctest: +SKIP
    >>> model = as_classifier(lm.model, train.label_names)                    # doctest: +SKIP
    >>> finetune(model, train, steps=100)                                     # doctest: +SKIP
    >>> evaluate_task(model, train)["accuracy"]                               # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunecli.errors import DataError, UnsupportedModelError

#: parameter-name prefixes of a sequence classifier's task head (BERT/RoBERTa ``classifier``,
#: the pooler matched separately)
_HEAD_PREFIXES = ("classifier.", "pooler.", "score.")


@dataclasses.dataclass
class TaskData:
    """A tokenised labelled task.

    Attributes:
        input_ids: ``[n, max_length]`` token ids, right-padded.
        attention_mask: ``[n, max_length]``, 1 on real tokens.
        labels: ``[n]`` class indices into ``label_names``.
        label_names: class names in index order.
        source: where the examples came from.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    label_names: list[str]
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, order: Tensor | None = None) -> Iterable[dict[str, Tensor]]:
        """Batches trimmed to their longest example (padding beyond it is dropped)."""
        idx = order if order is not None else torch.arange(len(self))
        for start in range(0, len(idx), batch_size):
            b = idx[start : start + batch_size]
            mask = self.attention_mask[b]
            width = max(1, int(mask.sum(dim=1).max()))
            yield {
                "input_ids": self.input_ids[b, :width],
                "attention_mask": mask[:, :width],
                "labels": self.labels[b],
            }

    def calibration_ids(self, n: int) -> Tensor:
        """The first ``n`` examples as token windows ``[n, width]`` for calibration observers."""
        width = max(1, int(self.attention_mask[:n].sum(dim=1).max()))
        return self.input_ids[:n, :width]


def read_labelled(
    path: str | Path, text_field: str, label_field: str, limit: int | None = None
) -> list[tuple[str, str]]:
    """``(text, label)`` pairs of a ``.jsonl`` file.

    Raises:
        DataError: the file is missing, a line is not JSON, or a field is missing.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"task file not found: {p}", hint="pass a .jsonl file with one labelled example per line"
        )
    rows: list[tuple[str, str]] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno} is not JSON: {e}") from None
            if not isinstance(obj, dict) or text_field not in obj or label_field not in obj:
                raise DataError(
                    f"{p}:{lineno} has no {text_field!r} and {label_field!r} fields",
                    hint="choose them with --text-field and --label-field",
                )
            rows.append((str(obj[text_field]), str(obj[label_field])))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"task file {p} holds no examples")
    return rows


def load_task(
    path: str | Path,
    tokenizer: Any,
    *,
    text_field: str = "text",
    label_field: str = "label",
    max_length: int = 128,
    limit: int | None = None,
    label_names: Sequence[str] | None = None,
) -> TaskData:
    """Tokenise a labelled ``.jsonl`` file.

    Args:
        path: the file.
        tokenizer: the model's tokenizer.
        text_field: JSON key of the text.
        label_field: JSON key of the label (any JSON value; compared as a string).
        max_length: tokens per example (longer texts are truncated).
        limit: read at most this many examples (the first ones).
        label_names: class names in index order (a model's ``id2label``); default: the
            sorted distinct labels of the file.

    Raises:
        DataError: bad file, or a label that ``label_names`` does not know.
    """
    if tokenizer is None:
        raise DataError(
            "a task needs the model's tokenizer", hint="load a model folder that has tokenizer files"
        )
    rows = read_labelled(path, text_field, label_field, limit)
    names = list(label_names) if label_names is not None else sorted({lab for _, lab in rows})
    if len(names) < 2:
        raise DataError(f"task {path} has a single label {names!r}; a classifier needs at least two")
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({lab for _, lab in rows if lab not in index})
    if unknown:
        raise DataError(f"labels {unknown[:3]} of {path} are not among the model's labels {names}")
    enc = tokenizer(
        [t for t, _ in rows],
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return TaskData(
        input_ids=enc["input_ids"].long(),
        attention_mask=enc["attention_mask"].long(),
        labels=torch.tensor([index[lab] for _, lab in rows], dtype=torch.long),
        label_names=names,
        source=str(path),
    )


def model_label_names(model: nn.Module) -> list[str] | None:
    """The class names a sequence classifier was saved with, or ``None`` for a bare encoder or
    default names (``LABEL_0``...)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    if not is_classifier(model) or not id2label:
        return None
    names = [str(id2label[i]) for i in sorted(int(k) for k in id2label)]
    return None if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names


def is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def as_classifier(model: nn.Module, label_names: Sequence[str], seed: int = 0) -> nn.Module:
    """``model`` as a sequence classifier over ``label_names``.

    A bare encoder (``BertModel``, ``RobertaModel``, ...) becomes its family's
    ``...ForSequenceClassification`` built from the same config, with the encoder's weights
    and a new randomly initialised (seeded) classifier head. A classifier with the right
    number of labels is returned as it is.

    Raises:
        UnsupportedModelError: the family has no sequence-classification class.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    names = [str(n) for n in label_names]
    if is_classifier(model):
        if model.config.num_labels != len(names):
            raise UnsupportedModelError(
                f"the model classifies into {model.config.num_labels} labels, the task has {len(names)}"
            )
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}
        return model
    cls_name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model.config.model_type)
    if not isinstance(cls_name, str) or not hasattr(transformers, cls_name):
        raise UnsupportedModelError(
            f"model_type {model.config.model_type!r} has no sequence-classification class"
        )
    cls = getattr(transformers, cls_name)
    config = model.config
    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    config.architectures = [cls_name]
    torch.manual_seed(seed)
    ref = next(model.parameters())
    clf = cls(config).to(device=ref.device, dtype=ref.dtype)
    # the classifier's encoder is the given model itself (weights shared, pooler included
    # when the encoder has one; a pooler the encoder lacks stays freshly initialised)
    prefix = clf.base_model_prefix
    base = getattr(clf, prefix)
    state = model.state_dict()
    missing = [k for k in base.state_dict() if k not in state]
    if any(not k.startswith("pooler.") for k in missing):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not the encoder of {cls_name} (missing {missing[:2]})"
        )
    if missing:
        model.pooler = base.pooler
    setattr(clf, prefix, model)
    return clf.eval()


def finetune(
    model: nn.Module,
    data: TaskData,
    *,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    extra_params: Sequence[nn.Parameter] = (),
    extra_lr: float | None = None,
    head_lr_scale: float = 20.0,
    aux_loss: Callable[[int], Tensor | None] | None = None,
    step_hook: Callable[[int], None] | None = None,
) -> list[float]:
    """Fine-tune ``model`` (a sequence classifier) for ``steps`` AdamW steps on ``data``.

    The learning rate decays linearly to zero; batches are drawn in a seeded random order
    (epochs repeat with a new order). Dropout is active during the steps; the model is back
    in eval mode at the end.

    Args:
        model: the classifier.
        data: the task.
        steps: optimiser steps (0: nothing happens).
        lr: peak learning rate.
        batch_size: examples per step.
        seed: order of the examples.
        extra_params: more parameters to optimise (a router, an expander).
        extra_lr: their peak learning rate (default ``lr``).
        head_lr_scale: the classifier and pooler learn at ``lr * head_lr_scale``: a freshly
            initialised head moves about ``lr`` per Adam step, too little in a short budget
            (all-MiniLM-L6-v2 stayed below the majority class after 48 steps at 1e-4).
        aux_loss: ``aux_loss(step)`` after each forward pass, added to the loss (or ``None``).
        step_hook: called with the step index before each forward pass.

    Returns:
        The task loss of every step.
    """
    if steps <= 0:
        return []
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if n.startswith(_HEAD_PREFIXES) or ".pooler." in n]
    head_ids = {id(p) for p in head}
    own = [p for _, p in named if id(p) not in head_ids]
    params = own + head + list(extra_params)
    groups = [{"params": own, "lr": lr}, {"params": head, "lr": lr * head_lr_scale}]
    if extra_params:
        groups.append({"params": list(extra_params), "lr": extra_lr if extra_lr is not None else lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses: list[float] = []
    model.train()
    try:
        step = 0
        while step < steps:
            order = torch.randperm(len(data), generator=gen)
            for batch in data.batches(batch_size, order):
                if step >= steps:
                    break
                if step_hook is not None:
                    step_hook(step)
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                loss = nn.functional.cross_entropy(out.logits.float(), batch["labels"])
                losses.append(float(loss.detach()))
                extra = aux_loss(step) if aux_loss is not None else None
                if extra is not None:
                    loss = loss + extra
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                step += 1
    finally:
        model.eval()
        opt.zero_grad(set_to_none=True)
    return losses


def macro_f1(pred: Tensor, gold: Tensor, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 scores (a class absent from both counts as F1 0).

    Example:
        >>> macro_f1(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]), 2)
        0.7333333333333334
    """
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / num_classes


@torch.no_grad()
def predict(model: nn.Module, data: TaskData, batch_size: int = 64) -> tuple[Tensor, float]:
    """Predicted classes of every example and the seconds spent in forward passes."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds, seconds = [], 0.0
    try:
        for batch in data.batches(batch_size):
            t = time.perf_counter()
            out = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            )
            preds.append(out.logits.argmax(dim=-1).cpu())
            seconds += time.perf_counter() - t
    finally:
        model.train(was_training)
    return torch.cat(preds), seconds


def evaluate_task(model: nn.Module, data: TaskData, batch_size: int = 64) -> dict[str, Any]:
    """Accuracy, macro-F1 and forward-pass throughput of a classifier on a task.

    Returns:
        ``{"accuracy", "macro_f1", "examples", "examples_per_s", "eval_seconds"}``.

    Raises:
        UnsupportedModelError: the model is not a sequence classifier.
    """
    if not is_classifier(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no classification head",
            hint="evaluate a checkpoint fine-tuned on the task (prunecli compress ... --task FILE)",
        )
    if model.config.num_labels != len(data.label_names):
        raise DataError(f"the model has {model.config.num_labels} labels, the task {len(data.label_names)}")
    pred, seconds = predict(model, data, batch_size)
    acc = float((pred == data.labels).float().mean())
    return {
        "accuracy": acc,
        "macro_f1": macro_f1(pred, data.labels, len(data.label_names)),
        "examples": len(data),
        "examples_per_s": len(data) / seconds if seconds > 0 else math.inf,
        "eval_seconds": seconds,
    }
