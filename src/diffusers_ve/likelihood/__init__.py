"""Likelihood estimators as functions of a denoiser ``yhat(z, t)`` (VE terms): the ELBO, the ODE, discrete data."""

from .common import Estimate, image_generators, image_seed
from .discrete import bits_per_dim, nats_from_bits_per_dim
from . import common, discrete, ode
from .elbo import elbo_integrand, elbo_log_likelihood
from .ode import ode_log_likelihood
from .prior import Prior, make_prior, prior_kl, prior_log_prob

__all__ = ["Estimate", "Prior", "bits_per_dim", "elbo_integrand", "elbo_log_likelihood", "image_generators", "image_seed",
           "make_prior", "nats_from_bits_per_dim", "ode_log_likelihood", "prior_kl", "prior_log_prob"]
