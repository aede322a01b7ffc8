"""Likelihood estimators as functions of a denoiser ``yhat(z, t)`` (VE terms): the ELBO, the ODE, discrete data."""

from .common import Estimate, image_generators, image_seed
from .discrete import bits_per_dim, nats_from_bits_per_dim
from . import common, discrete, ode
from .elbo import elbo_integrand, elbo_log_likelihood
from .ode import ode_log_likelihood
from .options import LikelihoodOptions
from .prior import Prior, make_prior, prior_kl, prior_log_prob
from .record import load_data_record, save_data_record
from .stats import format_stderr, mean_bits_per_dim
from .tmin import default_t_min, quantisation_t_min

__all__ = ["Estimate", "LikelihoodOptions", "Prior", "bits_per_dim", "default_t_min", "elbo_integrand",
           "elbo_log_likelihood", "format_stderr", "image_generators", "image_seed", "load_data_record", "make_prior",
           "mean_bits_per_dim", "nats_from_bits_per_dim", "ode_log_likelihood", "prior_kl", "prior_log_prob",
           "quantisation_t_min", "save_data_record"]
