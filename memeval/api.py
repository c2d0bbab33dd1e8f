"""The method interfaces (DESIGN §3) and the data a method receives.

A method never sees a protocol's ground truth: a localizer receives a :class:`Batch` of sequences whose
suffix it should explain, an editor receives the sequences to forget (and optionally to retain).

Every method class declares ``name``, ``kind``, a one-line ``summary``, a ``paper`` reference and a
``Config`` dataclass of hyperparameters whose defaults are the published ones. Task YAMLs and the CLI
override fields of that dataclass by name (:func:`build_config`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Literal, Sequence

import torch

from memeval.errors import UsageError, closest

if TYPE_CHECKING:
    from memeval.models import NeuronModel

Kind = Literal["localizer", "editor", "predictor", "detector"]
KINDS: tuple[str, ...] = ("localizer", "editor", "predictor", "detector")


@dataclass(frozen=True)
class TokenSequence:
    """One sequence of token ids; tokens at positions ``>= prefix_len`` form the scored suffix."""

    id: str
    input_ids: tuple[int, ...]
    prefix_len: int

    def __post_init__(self) -> None:
        if not 0 <= self.prefix_len < len(self.input_ids):
            raise ValueError(f"sequence {self.id}: prefix_len {self.prefix_len} outside 0..{len(self.input_ids) - 1}")


@dataclass
class Batch:
    """A batch of independent, right-padded sequences (what a localizer receives).

    ``loss_mask[b, t]`` is True when token ``t`` of row ``b`` is a suffix token: its prediction from
    positions ``< t`` defines "memorized". Token 0 has no prediction and is never in the mask (a sequence
    with ``prefix_len = 0`` is scored from token 1). Padding has ``attention_mask == 0`` and ``loss_mask == False``.
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    loss_mask: torch.Tensor  # [B, T] bool
    item_ids: list[str]

    @classmethod
    def from_sequences(cls, seqs: Sequence[TokenSequence], pad_id: int, device: torch.device | str) -> "Batch":
        width = max(len(s.input_ids) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        loss = torch.zeros((len(seqs), width), dtype=torch.bool)
        for row, s in enumerate(seqs):
            n = len(s.input_ids)
            ids[row, :n] = torch.tensor(s.input_ids, dtype=torch.long)
            attn[row, :n] = 1
            loss[row, max(s.prefix_len, 1) : n] = True  # token 0 is never predicted
        return cls(ids.to(device), attn.to(device), loss.to(device), [s.id for s in seqs])

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor | list[int]) -> "Batch":
        """The sub-batch of the given rows (padding columns kept)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        ids = [self.item_ids[i] for i in idx.tolist()]
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.loss_mask[idx], ids)


@dataclass
class SequenceSet:
    """A set of sequences an editor should forget or retain, handed out in batches."""

    sequences: list[TokenSequence]
    pad_id: int

    def __len__(self) -> int:
        return len(self.sequences)

    def batches(self, size: int, device: torch.device | str) -> Iterator[Batch]:
        for start in range(0, len(self.sequences), size):
            yield Batch.from_sequences(self.sequences[start : start + size], self.pad_id, device)


class Method:
    """Base of every method. Subclasses set the class attributes and nest a ``Config`` dataclass."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # Privileged inputs beyond those of its kind that the method needs (e.g. ("shadows",) for a detector
    # given shadow models); recorded with its results and shown on the leaderboard.
    requires: ClassVar[tuple[str, ...]] = ()

    @dataclass
    class Config:
        seed: int = 0

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "kind": cls.kind,
            "summary": cls.summary,
            "paper": cls.paper,
            **({"requires": list(cls.requires)} if cls.requires else {}),
            "config": dataclasses.asdict(cls.Config()),
        }


class Localizer(Method):
    """Scores every MLP neuron for its responsibility for each row's memorized suffix."""

    kind = "localizer"
    # True: localize() also accepts a model whose rows carry different down-projection columns (INJ then scores
    # a batch of injected items in one call; memeval.batched). Such a method reads weights only as
    # ``model.down_proj(layer, row=b)`` and runs any forward of other rows than its batch's inside
    # ``with model.rows(index):``. False (the default): INJ hands it one item at a time.
    per_row_weights: ClassVar[bool] = False

    def localize(self, model: "NeuronModel", batch: Batch) -> torch.Tensor:
        """Return attribution scores ``[B, num_layers, num_neurons]``; higher = more responsible."""
        raise NotImplementedError


class Editor(Method):
    """Returns a new model with the forget set removed; the model it receives is left untouched."""

    kind = "editor"

    def edit(
        self, model: "NeuronModel", forget: SequenceSet | None, retain: SequenceSet | None, budget: float
    ) -> "NeuronModel":
        raise NotImplementedError


# Features a prediction protocol computes once per sequence and hands to the predictors that ask for them
# (``Predictor.features``); see :class:`PredictionExample`.
PREDICTION_FEATURES = ("hidden", "entropy", "loss", "zlib", "source_matches")


@dataclass
class PredictionExample:
    """One training sequence as a predictor sees it (Chen, Han & Miyao 2024; Biderman et al. 2023).

    ``input_ids`` is the true sequence: ``prefix_len`` context tokens then ℓ continuation tokens. ``features``
    holds what the predictor asked for, computed by the protocol under the *feature model* (the scored model,
    or an earlier checkpoint for forecasting tasks), position ``i`` of a per-token feature being continuation
    token ``i``:

    - ``hidden`` ``[prefix_len + ℓ - 1, d]``: the hidden states of one layer over the context and the feature
      model's own greedy continuation (the paper's input; row ``prefix_len - 1 + i`` predicts token ``i``);
    - ``entropy`` ``[ℓ]``: entropy (nats) of the next-token distribution at each greedy generation step;
    - ``loss`` ``[ℓ]``: teacher-forced NLL (nats) of each true continuation token;
    - ``zlib`` ``[1]``: compressed / raw byte length of the decoded true sequence;
    - ``source_matches`` ``[ℓ]``: the feature model's own greedy match vector (1 = its token i is the true one).

    ``matches`` (the scored model's greedy match vector, the label) is set on train and validation examples
    only; test examples carry ``None``.
    """

    id: str
    input_ids: tuple[int, ...]
    prefix_len: int
    features: dict[str, torch.Tensor]
    matches: tuple[bool, ...] | None = None

    @property
    def suffix_len(self) -> int:
        return len(self.input_ids) - self.prefix_len


@dataclass
class Prediction:
    """A predictor's answer for one sequence: ``token_probs`` ``[ℓ]`` = P(greedy token i matches the true
    one), and ``score`` = how likely the whole continuation is reproduced (higher = more memorized; the
    sequence-level ROC AUC and the forecast's memorized set, ``score ≥ 0.5``, use it)."""

    token_probs: torch.Tensor
    score: float


class Predictor(Method):
    """Predicts, for each training sequence, which continuation tokens greedy decoding reproduces.

    The protocol calls ``fit(train, validation)`` once per split (labelled examples), then
    ``predict(test)`` (unlabelled), and scores the predictions against test labels it never hands out.
    ``features`` names what the predictor needs from :data:`PREDICTION_FEATURES`; only those are computed.
    ``validation_is_test`` (default False) is for faithful reproductions of reference code that selected its
    model on the test split: the protocol then passes the labelled test examples as ``validation`` and marks
    the results ``selected_on_test = 1``."""

    kind = "predictor"
    features: ClassVar[tuple[str, ...]] = ()

    @property
    def validation_is_test(self) -> bool:
        return False

    def fit(self, train: list[PredictionExample], validation: list[PredictionExample]) -> None:
        """Learn from labelled examples (may do nothing)."""

    def predict(self, test: list[PredictionExample]) -> list[Prediction]:
        raise NotImplementedError


@dataclass
class LabeledSamples:
    """The training samples of a classifier, as a detector receives them (Dentan et al. 2025 §3).

    ``labels`` are the labels the model was trained on, label noise included; nothing says which samples
    carry noise, which samples other models trained on, or what the model became at the end of training.
    ``inputs`` is whatever the model view consumes: a float tensor ``[N, D]`` for a vector classifier,
    a list of token-id tuples (each a prompt ending where the answer token is predicted) for a language model.
    """

    ids: list[str]
    inputs: Any
    labels: torch.Tensor  # [N] long, class indices 0..num_classes-1

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: Sequence[int]) -> "LabeledSamples":
        rows = list(rows)
        inputs = self.inputs[torch.as_tensor(rows, dtype=torch.long)] if torch.is_tensor(self.inputs) \
            else [self.inputs[i] for i in rows]
        return LabeledSamples([self.ids[i] for i in rows], inputs, self.labels[torch.as_tensor(rows, dtype=torch.long)])


class ClassifierModel:
    """A classifier as a detector sees it, whatever it is underneath (an MLP, or a causal LM answering
    one label token): hidden features at the answer position and the logits of the classes.

    ``num_layers`` hidden layers are numbered ``0..num_layers-1``; ``-1`` is the last. For a causal LM,
    ``features(samples, l)`` is the output of decoder block ``l`` at the position that predicts the
    answer token (Dentan et al.: the token before the label) and ``class_logits`` are the logits of the
    label tokens there; ``lm`` is the :class:`memeval.models.NeuronModel` (None for other models).
    """

    num_classes: int
    num_layers: int
    lm: "NeuronModel | None" = None

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def features(self, samples: LabeledSamples, layer: int = -1) -> torch.Tensor:
        """Hidden representation ``[N, d]`` (float) of each sample at ``layer``."""
        raise NotImplementedError

    def class_logits(self, samples: LabeledSamples) -> torch.Tensor:
        """Logits ``[N, num_classes]`` of the class labels for each sample."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest of the weights (the protocol checks that a detector leaves them unchanged)."""
        raise NotImplementedError


@dataclass
class ShadowModels:
    """Privileged information, given only to detectors that declare ``requires = ("shadows",)``:
    other models trained like the target on random halves of the pool, at the same (early) point of
    training, and ``membership[k, n]`` = sample ``n`` was in shadow ``k``'s training set."""

    models: list[ClassifierModel]
    membership: torch.Tensor  # [K, N] bool


class Detector(Method):
    """Scores each training sample's memorization risk from an early checkpoint of the model.

    ``score(model, samples)`` receives the target model at the prediction checkpoint (a
    :class:`ClassifierModel`) and its training samples, and returns ``[N]`` risk scores (higher = more
    likely to be memorized at the end of training). A detector whose ``requires`` contains ``"shadows"``
    is also given :class:`ShadowModels` (a reference method, marked as such on the leaderboard); no other
    detector ever receives them.
    """

    kind = "detector"

    def score(self, model: ClassifierModel, samples: LabeledSamples,
              shadows: ShadowModels | None = None) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Typed config overrides


def coerce_value(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; strings (from the CLI, or YAML's ``1e-3``) are parsed.

    Raises a :class:`UsageError` ``"<where>: expected ..., got ..."``.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a mapping, got {value!r}")
        return {coerce_value(k, key_tp, where): coerce_value(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg, where)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):  # "1,2", "[1, 2]" or "[]" from the command line
            value = [v.strip() for v in value.strip().removeprefix("[").removesuffix("]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [coerce_value(v, inner, where) for v in value]
        return items if origin is list else tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise UsageError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UsageError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"{where}: expected a string, got {value!r}")
    return value


def build_config(method_cls: type[Method], overrides: dict[str, Any], source: str = "config") -> Any:
    """The method's ``Config`` with ``overrides`` applied, each checked against the field's type.

    ``source`` names where the overrides came from (a YAML file or ``--method-config``) for errors.
    """
    cfg_cls = method_cls.Config
    hints = typing.get_type_hints(cfg_cls)
    names = [f.name for f in dataclasses.fields(cfg_cls)]
    values = {}
    for key, value in overrides.items():
        if key not in names:
            raise UsageError(
                f"{source}: method '{method_cls.name}' has no hyperparameter '{key}'{closest(key, names)}; "
                f"it has: {', '.join(names)}"
            )
        values[key] = coerce_value(value, hints[key], f"{source}: {method_cls.name}.{key}")
    return cfg_cls(**values)
