"""Discrete Markov Bridge (docs/dmb.md): a learned rate matrix plus a learned concrete score, trained
alternately, evaluated by an upper bound on −log-likelihood in bits per token; SEDD's absorbing and
uniform chains as baselines in the same code.

    from slimrate.dmb import DMBConfig, train_dmb, load_model
    train_dmb(DMBConfig(out_dir="runs/dmb", data="text8", steps=2000))
"""

from slimrate.dmb.baselines import AbsorbingRates, UniformRates
from slimrate.dmb.data import TokenData, image_grid_png, load_token_data, read_cifar10_batch
from slimrate.dmb.driver import METHODS, DMBConfig, DMBModel, bound_of, load_model, official_bound_of, train_dmb
from slimrate.dmb.elbo import ElboResult, OfficialResult, elbo_bits, official_bits
from slimrate.dmb.losses import matrix_bound_loss, matrix_loss, prior_kl, score_loss
from slimrate.dmb.model import MODEL_PRESETS, ScoreNet, ScoreNetConfig
from slimrate.dmb.noise import GeometricNoise, LogLinearNoise, make_noise
from slimrate.dmb.rate_matrix import RATE_INITS, RateMatrix, data_permutation, initial_rates
from slimrate.dmb.sampler import estimate_p0, reverse_sample

__all__ = ["METHODS", "MODEL_PRESETS", "RATE_INITS", "AbsorbingRates", "DMBConfig", "DMBModel", "ElboResult",
           "GeometricNoise", "LogLinearNoise", "OfficialResult", "RateMatrix", "ScoreNet", "ScoreNetConfig",
           "TokenData", "UniformRates", "bound_of", "data_permutation", "elbo_bits", "estimate_p0", "image_grid_png",
           "initial_rates", "load_model", "load_token_data", "make_noise", "matrix_bound_loss", "matrix_loss",
           "official_bits", "official_bound_of", "prior_kl", "read_cifar10_batch", "reverse_sample", "score_loss",
           "train_dmb"]
