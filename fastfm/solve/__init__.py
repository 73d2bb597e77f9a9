"""The solve: settings a user gives (``InferenceSettings``), resolved against a run into a ``SolvePlan`` that runs
from explicit inputs, and the samplers that draw those inputs and call it (``EagerSampler``; the export layer's
``EngineSampler``)."""

from .likelihood import ode_likelihood
from .ode import ode_sample
from .plan import PLAN_KINDS, TASKS, SolvePlan, plan_solve
from .sampler import EagerSampler, Sampler, nll_report
from .sde import sde_sample
from .settings import DEFAULTS, InferenceSettings, settings_with

__all__ = ["DEFAULTS", "PLAN_KINDS", "TASKS", "EagerSampler", "InferenceSettings", "Sampler", "SolvePlan",
           "nll_report", "ode_likelihood", "ode_sample", "plan_solve", "sde_sample", "settings_with"]
