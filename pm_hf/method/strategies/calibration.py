"""The closed form's calibrations (`alpha_calibration`, docs/method.md, calibrated closed forms): how task t's Fisher
is scaled, kappa_t F_t, before it enters alpha and S, G — one class each with its own knobs, registered by name with
`@register_calibration`. 'none' keeps the Fisher as measured (the paper)."""

from __future__ import annotations

from typing import ClassVar

from ...config.checks import check_number, invalid, is_number
from ..merge import AlphaChoice, alpha_terms, branch_secant, curve_alpha, secant_kappa, zeros_like_dict
from .knobs import Knob, default_knobs, knob_names, registrar


class Calibration:
    """Base class: a calibration scales the Fisher by kappa_t = target / <F_t, Delta^2> (`secant_kappa`), the target
    being the loss drop 2 (L(0) - L(1)) its subclass measures on the task's `TaskProbe` (`target`); it may also choose
    alpha itself (`choose`). Subclasses set `name`, their `knobs` and implement `target`."""

    name: ClassVar[str] = ""
    knobs: ClassVar[tuple[str | Knob, ...]] = ()  # `MergeArguments` fields or declared `Knob`s
    needs_probe: ClassVar[bool] = True  # it measures the task along the merge line

    def __init__(self, **knobs):
        values = {**default_knobs(type(self)), **knobs}
        for name in knob_names(type(self)):
            setattr(self, name, values[name])

    @classmethod
    def parameters(cls) -> tuple[str | Knob, ...]:
        return cls.knobs

    @staticmethod
    def check(values) -> None:
        """Raise `ValueError` naming field, value and fix for a bad knob (`values`: every knob as an attribute)."""

    @property
    def holdout(self) -> float:
        """The fraction of each task's training data held out for the probe (not trained on)."""
        return 0.0

    def target(self, probe, info: dict) -> float:
        raise NotImplementedError

    def calibrate(self, context, deltas: dict, fisher: dict) -> tuple[dict, dict | None]:
        """kappa_t F_t and what was measured (logged as the task's `calibration`)."""
        probe = context.probe
        if probe is None:
            raise ValueError(f"alpha_calibration {self.name!r} needs the task's probe (`TaskProbe`).")
        fd2 = alpha_terms(deltas, fisher, *(zeros_like_dict(deltas),) * 2).fisher_delta_sq
        info = {"method": self.name, "fisher_delta_sq": fd2}
        target = self.target(probe, info)
        kappa = secant_kappa(target, fd2)
        info.update(target=target, kappa=kappa)
        return {k: v * kappa for k, v in fisher.items()}, info

    def choose(self, deltas: dict, S: dict, G: dict, info: dict | None, alpha_min: float) -> AlphaChoice | None:
        """Task t's alpha when the calibration chooses it (None: the closed form over the calibrated Fisher does)."""
        return None


CALIBRATIONS: dict[str, type[Calibration]] = {}


register_calibration = registrar(CALIBRATIONS, "calibration")  # `@register_calibration`: `alpha_calibration: <name>`


def get_calibration(name: str) -> type[Calibration]:
    if name not in CALIBRATIONS:
        raise invalid("alpha_calibration", name, f"use one of {list(CALIBRATIONS)}.")
    return CALIBRATIONS[name]


def calibration_knobs() -> list[str | Knob]:
    """The knobs of every registered calibration (the closed form takes each, for whichever is chosen)."""
    return [knob for cls in CALIBRATIONS.values() for knob in cls.parameters()]


@register_calibration
class NoCalibration(Calibration):
    """The Fisher as measured (the paper)."""

    name = "none"
    needs_probe = False

    def calibrate(self, context, deltas, fisher):
        return fisher, None


def secant_target(probe, info: dict) -> float:
    """2 (L(0) - L(1)) on the task's training sample (the Fisher's)."""
    at0, at1 = probe.loss(0.0), probe.loss(1.0)
    info.update(loss_at_0=at0, loss_at_1=at1)
    return 2.0 * (at0 - at1)


@register_calibration
class SecantCalibration(Calibration):
    """The secant at alpha = 0 on the task's own training sample."""

    name = "secant"

    def target(self, probe, info):
        return secant_target(probe, info)


@register_calibration
class BranchCalibration(Calibration):
    """The same secant from the perturbation's late branch losses, 2 (L_minus - L_0) / eps^2 (else 'secant')."""

    name = "branch"

    def target(self, probe, info):
        losses = probe.branch_losses
        target = branch_secant(losses.get(-1), losses.get(0), probe.eps)
        info.update(branch_losses={str(b): v for b, v in losses.items()}, branch_secant=target)
        return target if target is not None else secant_target(probe, info)


@register_calibration
class CurveCalibration(Calibration):
    """alpha_t minimises the task's measured loss along alpha on a held-out part of its training data plus the old
    tasks' calibrated quadratic; kappa_t from the curve's ends."""

    name = "curve"
    knobs = ("calibration_holdout", "calibration_grid")

    @staticmethod
    def check(values) -> None:
        check_number("calibration_holdout", values.calibration_holdout, 0, 0.5, low_open=True)
        grid = values.calibration_grid
        if not isinstance(grid, list) or not grid or not all(is_number(a) and 0 <= a <= 1 for a in grid):
            raise invalid("calibration_grid", grid, "give a list of alphas in [0, 1], e.g. [0, 0.05, ..., 1].")
        if values.alpha_calibration == "curve" and values.alpha_granularity != "global":
            raise invalid("alpha_granularity", values.alpha_granularity, "the measured curve gives one alpha per task.")

    @property
    def holdout(self) -> float:
        return self.calibration_holdout

    def target(self, probe, info):
        grid = sorted({float(a) for a in self.calibration_grid} | {0.0, 1.0})
        losses = [probe.heldout_loss(a) for a in grid]
        info.update(grid=grid, heldout_losses=losses)
        return 2.0 * (losses[0] - losses[-1])

    def choose(self, deltas, S, G, info, alpha_min):
        old = alpha_terms(deltas, zeros_like_dict(deltas), S, G)  # <G, Delta> and <S, Delta^2>
        grid, losses = info["grid"], info["heldout_losses"]
        info["alpha"], info["objective"] = curve_alpha(grid, losses, old.g_delta, old.denominator)
        return AlphaChoice(min(max(info["alpha"], alpha_min), 1.0), info["alpha"])
