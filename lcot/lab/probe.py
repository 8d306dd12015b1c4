"""Linear probes: does latent j hold the intermediate state after step j?

A record may carry the intermediate states of its reasoning in an extra JSONL field (the hops task's
`states`: the colour reached after each hop). For every latent position j and every step i, a ridge
classifier (closed form, so the result is deterministic) is fit on training latents to predict
state i, and scored on test latents. The diagonal i = j answers the question above; the rest of the
grid shows where else a state can be read off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lcot.pipeline.evaluate import table

RIDGE = 1.0  # ridge penalty on standardised features


def fit_ridge(x: torch.Tensor, labels: Sequence[str], ridge: float = RIDGE
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(mean, std, weights (H+1, C), classes) of a one-vs-rest ridge classifier on standardised features."""
    classes = sorted(set(labels))
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6) if len(x) > 1 else torch.ones(x.shape[1], dtype=x.dtype)
    z = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    y = torch.zeros(len(x), len(classes), dtype=x.dtype)
    y[torch.arange(len(x)), torch.tensor([classes.index(v) for v in labels])] = 1.0
    w = torch.linalg.solve(z.T @ z + ridge * torch.eye(z.shape[1], dtype=x.dtype), z.T @ y)
    return mean, std, w, classes


def predict(model: tuple, x: torch.Tensor) -> list[str]:
    mean, std, w, classes = model
    z = torch.cat([(x.double() - mean) / std, torch.ones(len(x), 1, dtype=torch.double)], 1)
    return [classes[i] for i in (z @ w).argmax(1).tolist()]


def probe_accuracy(x_train: torch.Tensor, y_train: Sequence[str], x_test: torch.Tensor, y_test: Sequence[str],
                   ridge: float = RIDGE) -> float:
    """Test accuracy of a ridge probe fit on (x_train, y_train)."""
    pred = predict(fit_ridge(x_train, y_train, ridge), x_test)
    return sum(p == t for p, t in zip(pred, y_test)) / max(len(y_test), 1)


@dataclass
class ProbeGrid:
    accuracy: list[list[float | None]]  # [latent j][step i], None where no test record has step i
    chance: list[float | None]  # per step i: the majority-class rate of the test states
    n_test: list[int]  # per step i: test records that reach step i

    def diagonal(self) -> list[float | None]:
        return [self.accuracy[j][j] if j < len(self.chance) else None for j in range(len(self.accuracy))]

    def summary(self) -> str:
        steps = len(self.chance)
        rows = [[f"latent {j + 1}", *row] for j, row in enumerate(self.accuracy)]
        rows.append(["chance (majority)", *self.chance])
        text = table(["probe accuracy", *[f"state {i + 1}" for i in range(steps)]], rows)
        warning = self.warning()
        return text + (f"\n{warning}" if warning else "")

    def warning(self, margin: float = 0.02) -> str | None:
        """A warning when no latent position predicts any state better than always guessing its majority state."""
        cells = [(a, c) for row in self.accuracy for a, c in zip(row, self.chance) if a is not None and c is not None]
        if not cells or any(a > c + margin for a, c in cells):
            return None
        return (f"WARNING: no probe beats its majority-state rate by more than {margin}: no intermediate state can be "
                "read off these latents linearly (the probe answers like a constant predictor)")

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "chance": self.chance, "n_test": self.n_test}


def probe_grid(train_latents: torch.Tensor, train_states: Sequence[Sequence[str]], test_latents: torch.Tensor,
               test_states: Sequence[Sequence[str]], ridge: float = RIDGE, min_train: int = 10) -> ProbeGrid:
    """Probe every latent position (N, K, H) for every intermediate state (records with fewer steps are left
    out of that state's probe)."""
    k = train_latents.shape[1]
    steps = max((len(s) for s in list(train_states) + list(test_states)), default=0)
    acc: list[list[float | None]] = [[None] * steps for _ in range(k)]
    chance: list[float | None] = [None] * steps
    n_test = [0] * steps
    for i in range(steps):
        tr = [n for n, s in enumerate(train_states) if len(s) > i]
        te = [n for n, s in enumerate(test_states) if len(s) > i]
        n_test[i] = len(te)
        if len(tr) < min_train or not te:
            continue
        y_tr, y_te = [train_states[n][i] for n in tr], [test_states[n][i] for n in te]
        chance[i] = max(y_te.count(v) for v in set(y_te)) / len(y_te)
        for j in range(k):
            acc[j][i] = probe_accuracy(train_latents[tr, j], y_tr, test_latents[te, j], y_te, ridge)
    return ProbeGrid(acc, chance, n_test)
