"""Per-target latency model: predicts measured onnxruntime latency from genome features (numpy only).

A linear model with non-negative coefficients (every feature can only add time), fitted by weighted least squares
with weights 1/y so that it minimises relative error, which is what a budget check cares about. It is a pre-filter
and a ranker, re-fitted as measurements arrive: a winner's latency is always measured, never predicted.

It can be fitted on one statistic of the measurements and predict another (`target`): fitted on the steadiest one
(on a shared machine the fastest of a profile's prefill runs moves far less between profiles than their median),
its predictions are scaled by the median ratio of the target statistic to the fitted one over the samples.

Accuracy is reported on held-out samples (k-fold): the share of predictions within +-10% and the mean relative
error. A caller with several ways to describe a sample (feature views: coarse ones need fewer samples, fine ones
fit better once there are enough) lets `fit_best_view` keep the view with the lower held-out error; the model
records its view, and its rows must be built with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

# 6: calls per operator; 5: prefill narrow_gflop; 4: prefill small_mb and large_mb; 3: shared_mb, `scale`
MODEL_VERSION = 6


def _nonneg_weighted_lstsq(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """min sum ((x w - y) / y)^2 + ridge |w|^2 subject to w >= 0 (active-set: refit without negative terms)."""
    scale = 1.0 / np.maximum(y, 1e-9)
    xs, ys = x * scale[:, None], y * scale
    active = np.ones(x.shape[1], dtype=bool)
    w = np.zeros(x.shape[1])
    for _ in range(x.shape[1] + 1):
        a = xs[:, active]
        lhs = a.T @ a + ridge * np.eye(a.shape[1])
        sol = np.linalg.solve(lhs, a.T @ ys)
        if (sol >= 0).all():
            w[:] = 0.0
            w[active] = sol
            return w
        idx = np.flatnonzero(active)
        active[idx[sol < 0]] = False  # drop the terms that want negative time
        if not active.any():
            break
    return w


@dataclass
class LatencyModel:
    metric: str  # decode | prefill
    feature_names: list[str]
    coef: list[float] = field(default_factory=list)
    intercept: float = 0.0
    n_samples: int = 0
    accuracy: dict = field(default_factory=dict)
    view: str = "default"  # how the caller built the feature rows (see fit_best_view)
    scale: float = 1.0  # target statistic / fitted statistic (median over the samples); 1 when they are the same

    def _matrix(self, rows: list[dict]) -> np.ndarray:
        return np.array([[float(r.get(f, 0.0)) for f in self.feature_names] + [1.0] for r in rows])

    def fit(self, rows: list[dict], y, ridge: float = 1e-6, target=None) -> "LatencyModel":
        """Fit on the measurements `y`; with `target` (another statistic of the same measurements), predict that."""
        y = np.asarray(y, dtype=float)
        if len(rows) != len(y) or len(y) == 0:
            raise ValueError("need as many feature rows as measurements, and at least one")
        w = _nonneg_weighted_lstsq(self._matrix(rows), y, ridge)
        self.coef, self.intercept, self.n_samples = [float(c) for c in w[:-1]], float(w[-1]), len(y)
        self.scale = 1.0 if target is None else float(np.median(np.asarray(target, dtype=float) / np.maximum(y, 1e-12)))
        return self

    def predict(self, rows: list[dict]) -> np.ndarray:
        return self._matrix(rows) @ np.array(self.coef + [self.intercept]) * self.scale

    def predict_one(self, row: dict) -> float:
        return float(self.predict([row])[0])

    def to_dict(self) -> dict:
        return {"model_version": MODEL_VERSION, "metric": self.metric, "feature_names": self.feature_names,
                "coef": self.coef, "intercept": self.intercept, "n_samples": self.n_samples, "accuracy": self.accuracy,
                "view": self.view, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        return cls(d["metric"], list(d["feature_names"]), list(d["coef"]), d["intercept"], d.get("n_samples", 0),
                   d.get("accuracy", {}), d.get("view", "default"), d.get("scale", 1.0))

    def save(self, path) -> None:
        from factory.io import atomic_write

        atomic_write(path, json.dumps(self.to_dict(), indent=2))


def feature_names(rows: list[dict]) -> list[str]:
    """Every feature any row has, sorted: a feature a row lacks is 0 for it (a genome that never calls an operator
    has no calls_<op>)."""
    return sorted(set().union(*rows)) if rows else []


def relative_errors(predicted, measured) -> np.ndarray:
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    return np.abs(predicted - measured) / np.maximum(measured, 1e-12)


def accuracy_summary(errors: np.ndarray) -> dict:
    return {
        "n": int(len(errors)),
        "within_10pct": float(np.mean(errors <= 0.10)) if len(errors) else float("nan"),
        "mean_relative_error": float(np.mean(errors)) if len(errors) else float("nan"),
        "max_relative_error": float(np.max(errors)) if len(errors) else float("nan"),
    }


def _held_out_errors(y: np.ndarray, folds: int, seed: int, predict) -> np.ndarray:
    """k-fold: `predict(train, test)` (index arrays) predicts the test samples from a model fitted on the train
    ones; the relative error against `y` of every sample, each predicted without it (empty below 3 samples)."""
    n = len(y)
    if n < 3:
        return np.array([])
    folds = min(folds, n)
    order = np.random.default_rng(seed).permutation(n)
    errors = np.empty(n)
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        errors[test] = relative_errors(predict(train, test), y[test])
    return errors


def _judged(y: np.ndarray, target) -> tuple[np.ndarray | None, np.ndarray]:
    """(the target statistic or None, what predictions are judged against)."""
    if target is None:
        return None, y
    target = np.asarray(target, dtype=float)
    if len(target) != len(y):
        raise ValueError("need a target value for every measurement")
    return target, target


def cross_validate(metric: str, rows: list[dict], y, folds: int = 5, seed: int = 0, target=None) -> dict:
    """Held-out accuracy: every sample is predicted by a model fitted without it (k-fold), judged against
    `target` when the model predicts another statistic than it is fitted on."""
    y = np.asarray(y, dtype=float)
    target, judged = _judged(y, target)
    names = feature_names(rows)

    def predict(train, test):
        model = LatencyModel(metric, names).fit([rows[i] for i in train], y[train],
                                                target=None if target is None else target[train])
        return model.predict([rows[i] for i in test])

    return accuracy_summary(_held_out_errors(judged, folds, seed, predict))


def fit_with_accuracy(metric: str, rows: list[dict], y, folds: int = 5, view: str = "default",
                      target=None) -> LatencyModel:
    model = LatencyModel(metric, feature_names(rows), view=view).fit(rows, y, target=target)
    model.accuracy = cross_validate(metric, rows, y, folds, target=target)
    return model


def _fit_views(metric: str, rows_by_view: dict[str, list[dict]], y, folds: int,
               target=None) -> tuple[LatencyModel, list]:
    """(the view with the lowest held-out mean relative error, the first on a tie; every view's model)."""
    fitted = [fit_with_accuracy(metric, rows, y, folds, view, target) for view, rows in rows_by_view.items()]

    def error(m: LatencyModel) -> float:
        e = m.accuracy["mean_relative_error"]
        return e if np.isfinite(e) else np.inf

    return min(fitted, key=error), fitted


def fit_best_view(metric: str, rows_by_view: dict[str, list[dict]], y, folds: int = 5, target=None) -> LatencyModel:
    """One model per view of the same samples; keep the lowest held-out mean relative error (the first on a tie).
    Fitted on `y`, predicting `target` when given (see the module's docstring).

    Its `accuracy` is the choice's own held-out accuracy (nested: in each fold the view is chosen without the
    held-out samples, so picking the better view does not flatter the number); `accuracy["views"]` has each view's.
    """
    y = np.asarray(y, dtype=float)
    target, judged = _judged(y, target)
    best, fitted = _fit_views(metric, rows_by_view, y, folds, target)

    def predict(train, test):
        chosen, _ = _fit_views(metric, {v: [r[i] for i in train] for v, r in rows_by_view.items()}, y[train], folds,
                               None if target is None else target[train])
        return chosen.predict([rows_by_view[chosen.view][i] for i in test])

    best.accuracy = {**accuracy_summary(_held_out_errors(judged, folds, 0, predict)),
                     "views": {m.view: m.accuracy for m in fitted}}
    return best
