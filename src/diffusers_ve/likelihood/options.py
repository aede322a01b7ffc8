"""``LikelihoodOptions``: the one set of parameters shared by the estimators, the pipeline and the CLI."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .common import check_positive_int
from .discrete import check_num_levels
from .prior import PRIORS, Prior, make_prior
from .tmin import default_t_min

METHODS = ("elbo", "ode", "both")
DEQUANTIZATIONS = ("decoder", "uniform")
DECODERS = ("levels", "bins")  # N(yhat, t_min) normalised over the level points, or integrated over the bins
TRACES = ("auto", "exact", "hutchinson")
SOLVERS = ("dopri5", "fixed")
VARIABLES = ("asinh", "sigma", "log_t")  # ODE integration variable s: sigma = sinh(s), t = s^2 or t = e^s
ERROR_NORMS = ("loglik", "state")  # ODE step error: its effect on ln p per dimension, or the state's mixed norm


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class LikelihoodOptions:
    """Every parameter of a likelihood evaluation (the ``help`` of each field is also its CLI help).

    Build with keywords (``LikelihoodOptions(method="ode", rtol=1e-3)``) or from another one with
    :meth:`replace`; :meth:`check` validates all fields at once, naming the field and its allowed values.
    """

    method: str = _opt("elbo", "elbo (a bound), ode (probability flow) or both")
    num_levels: Optional[int] = _opt(None, "n of n-level data (256 for 8-bit, 17 for the digits); None: continuous")
    t_min: Optional[float] = _opt(None, "lower end of the t integral (None: the rule for n-level data, "
                                        "0.6/(n-1)^2, clamped to the table; the table's first t when continuous)")
    t_max: Optional[float] = _opt(None, "upper end T (None: the model table's last t)")
    prior: Union[str, Prior] = _opt("vp", "prior at T: vp N(0,(1+T)I), ve N(0,T I) or moment")
    prior_moments: Optional[Sequence] = _opt(None, "(mean, variance) of the data for prior='moment'", cli=False)
    dequantization: Optional[str] = _opt(None, "n-level data: decoder (ELBO default) or uniform (ODE default)")
    num_t_samples: int = _opt(64, "ELBO: model calls per image for the integral over t")
    decoder: str = _opt("levels", "ELBO decoder for n-level data: levels (N(yhat, t_min) normalised over the level "
                                  "points, as VDM) or bins (N(yhat, t_min) integrated over each bin)")
    num_decoder_samples: int = _opt(8, "ELBO with the decoder: z(t_min) draws (model calls) per image")
    control_variate: bool = _opt(True, "ELBO: cross-fitted control variate", cli=False)
    batch_size: int = _opt(256, "ELBO: model batch (memory only; values do not depend on it)", cli=False)
    rtol: float = _opt(1e-3, "ODE: relative tolerance per step (per image; loglik: of the step's change of ln p)")
    atol: float = _opt(1e-3, "ODE: absolute tolerance per step (per image; loglik: nats per dimension)")
    error_norm: str = _opt("loglik", "ODE: a step's error measured as its effect on ln p per dimension (loglik) "
                                     "or as the RMS of the state and of ln p (state, the old norm)")
    solver: str = _opt("dopri5", "ODE: dopri5 (adaptive) or fixed (num_steps equal steps in ln t)")
    num_steps: int = _opt(16, "ODE: steps of the fixed solver")
    variable: str = _opt("asinh", "ODE: integration variable, asinh (sigma = sinh(s), sigma-like below 1, "
                                  "ln sigma-like above), sigma (t = s^2) or log_t")
    trace: str = _opt("auto", "ODE divergence: exact, hutchinson, or auto (exact up to d = 64)")
    num_probes: int = _opt(4, "ODE: Hutchinson probes per image (their spread is the standard error)")
    num_dequant: int = _opt(1, "ODE: uniform dequantisation repeats per image")

    @classmethod
    def build(cls, options: Optional["LikelihoodOptions"] = None, **fields) -> "LikelihoodOptions":
        """``options`` (or the defaults) with ``fields`` replaced, checked; an unknown name is a TypeError."""
        base = cls() if options is None else options
        if not isinstance(base, cls):
            raise TypeError(f"`options` must be a LikelihoodOptions; got {type(base).__name__}.")
        return base.replace(**fields).check()

    def replace(self, **fields) -> "LikelihoodOptions":
        names = [f.name for f in dataclasses.fields(self)]
        for k in fields:
            if k not in names:
                hint = difflib.get_close_matches(k, names, 1)
                raise TypeError(f"unknown likelihood option {k!r}" + (f"; did you mean {hint[0]!r}?" if hint else
                                                                      f"; the options are {names}."))
        return dataclasses.replace(self, **fields)

    def check(self) -> "LikelihoodOptions":
        """ValueError naming the first bad field and its allowed values; returns ``self``."""
        _choice("method", self.method, METHODS)
        check_num_levels(self.num_levels)
        if not isinstance(self.prior, Prior):
            _choice("prior", self.prior, PRIORS)
        _choice("decoder", self.decoder, DECODERS)
        _choice("trace", self.trace, TRACES)
        _choice("solver", self.solver, SOLVERS)
        _choice("variable", self.variable, VARIABLES)
        _choice("error_norm", self.error_norm, ERROR_NORMS)
        for name in ("num_t_samples", "num_decoder_samples", "batch_size", "num_steps", "num_probes", "num_dequant"):
            check_positive_int(getattr(self, name), name)
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"`{name}` must be a number > 0; got {v!r}.")
        self.dequantization_for(self.method if self.method != "both" else "elbo")
        return self

    def dequantization_for(self, method: str) -> Optional[str]:
        """The dequantisation ``method`` uses: None for continuous data, else ``dequantization`` or its default."""
        if self.num_levels is None:
            if self.dequantization not in (None, "none"):
                raise ValueError("`dequantization` needs `num_levels` (continuous data are not dequantised).")
            return None
        allowed = DEQUANTIZATIONS if method == "elbo" else ("uniform",)
        deq = self.dequantization or allowed[0]
        if deq not in allowed:
            raise ValueError(f"`dequantization` for method={method!r} must be one of {allowed}; got {deq!r}.")
        return deq

    def t_range(self, axis, method: str = "elbo") -> tuple[float, float]:
        """``(t_min, t_max)``: given values, else the table's ends, except the ELBO's ``t_min`` for n-level data
        with the discretised decoder: the quantisation rule (:func:`~diffusers_ve.likelihood.tmin.default_t_min`).
        ValueError unless ``t_0 <= t_min < t_max <= t_{K-1}`` of the model's table."""
        decoder = method == "elbo" and self.dequantization_for("elbo") == "decoder"
        rule_levels = self.num_levels if decoder else None
        lo = default_t_min(axis, rule_levels) if self.t_min is None else float(self.t_min)
        hi = axis.t_max if self.t_max is None else float(self.t_max)
        axis.check_range(lo, hi, "[`t_min`, `t_max`]")
        return lo, hi

    def make_prior(self, t_max: float) -> Prior:
        return self.prior if isinstance(self.prior, Prior) else make_prior(self.prior, t_max, self.prior_moments)

    def cli_fields(self):
        """The fields the CLI exposes (all but ``cli=False`` ones), as ``dataclasses.Field``s."""
        return [f for f in dataclasses.fields(self) if f.metadata.get("cli", True)]


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}; got {value!r}.")
