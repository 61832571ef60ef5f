"""Pure tensor math for diffusion models: schedules, forward process, targets, losses,
the denoiser wrapper and samplers. Imports neither Lightning nor Hydra."""

from .denoiser import Denoiser
from .losses import OBJECTIVES, WEIGHTINGS, diffusion_loss, min_snr_weight, training_target
from .process import (
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_posterior,
    q_sample,
    score_from_eps,
    v_from_x0_eps,
)
from .samplers import SAMPLERS, DDIMSampler, DDPMSampler, Sampler, build_sampler, ddim_invert, timesteps
from .schedule import BETA_SCHEDULES, NoiseSchedule, beta_schedule, extract

__all__ = [
    "BETA_SCHEDULES",
    "OBJECTIVES",
    "SAMPLERS",
    "WEIGHTINGS",
    "DDIMSampler",
    "DDPMSampler",
    "Denoiser",
    "NoiseSchedule",
    "Sampler",
    "beta_schedule",
    "build_sampler",
    "ddim_invert",
    "diffusion_loss",
    "extract",
    "min_snr_weight",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "q_posterior",
    "q_sample",
    "score_from_eps",
    "timesteps",
    "training_target",
    "v_from_x0_eps",
]
