"""KL coefficient controllers: fixed, or adaptive towards a target KL (Ziegler et al. 2019).

Layer: algorithms/ (plain Python). `current_kl` is a Python float: the caller reads the
step's mean KL once per step, after the all-reduce, so every rank updates identically.
"""

from __future__ import annotations


class FixedKLController:
    """A constant KL coefficient; `update` does nothing."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller on log(kl_coef) (Ziegler et al. 2019, section 2.2).

        e     = clip(current_kl / target - 1, -0.2, 0.2)
        value = value * (1 + e * n_steps / horizon)

    n_steps is the number of samples (episodes) the KL was measured over.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"adaptive KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"adaptive KL horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def make_kl_controller(
    kl_coef: float,
    adaptive: bool = False,
    target: float | None = None,
    horizon: float | None = None,
) -> FixedKLController | AdaptiveKLController:
    """FixedKLController(kl_coef), or AdaptiveKLController when `adaptive`.

    target and horizon are required (and must be > 0) only when `adaptive`.
    """
    if not adaptive:
        return FixedKLController(kl_coef)
    if target is None or horizon is None:
        raise ValueError("an adaptive KL controller needs both target and horizon")
    return AdaptiveKLController(kl_coef, target, horizon)
