"""The linear probe: a logistic-regression head (scikit-learn) on frozen, standardised backbone features.

The fitted standardisation and weights fold into one linear layer, so a probe is saved as an ordinary
classifier (backbone + head) that `encdec classify --predict` reads, and its probabilities are the
ones that layer gives.
"""

from __future__ import annotations

import numpy as np

from encdec.errors import EncdecError

# from strong to weak regularisation: on a tie of dev accuracy the stronger one is kept
DEFAULT_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
ABSENT = -1e4  # the bias of a label no training example has: never predicted


def check_available() -> None:
    """Fail before any work when scikit-learn (the `classify` extra) is missing."""
    try:
        import sklearn
    except ImportError:
        raise EncdecError("--probe needs scikit-learn: pip install -e '.[classify]'") from None


def parse_c(text: str | None) -> list[float]:
    """--probe-c as a comma list of positive numbers (the default grid without it), ascending."""
    if text is None:
        return list(DEFAULT_C)
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v < float("inf") for v in values):
        raise EncdecError(f"--probe-c {text!r}: expected a comma list of positive numbers like 0.01,0.1,1")
    return sorted(set(values))


def fit_head(features: np.ndarray, labels: list[int], num_labels: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight [num_labels, d], bias [num_labels]) of a logistic regression with inverse regularisation c,
    fitted on standardised features and folded back to act on the raw ones."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(set(labels)) < 2:
        raise EncdecError(f"the probe's training part has {len(labels)} examples of one label only; pass a larger "
                          "--limit (or, as the task allows, fewer --folds or --inner-folds, a smaller --dev-share)")
    scaler = StandardScaler().fit(features)
    model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(features), labels)
    coef = model.coef_ / scaler.scale_
    bias = model.intercept_ - coef @ scaler.mean_
    weight = np.zeros((num_labels, features.shape[1]), dtype=np.float64)
    full_bias = np.full(num_labels, ABSENT, dtype=np.float64)
    classes = model.classes_.tolist()
    if len(classes) == 2:  # one row: the log-odds of the second class against the first
        full_bias[classes[0]] = 0.0
        weight[classes[1]], full_bias[classes[1]] = coef[0], bias[0]
    else:
        for row, label in enumerate(classes):
            weight[label], full_bias[label] = coef[row], bias[row]
    return weight.astype(np.float32), full_bias.astype(np.float32)


def probabilities(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Softmax of the folded head's logits [N, num_labels]."""
    logits = features.astype(np.float64) @ weight.T.astype(np.float64) + bias
    logits -= logits.max(1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)
