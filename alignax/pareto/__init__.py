"""Multi-reward alignment: normalisation, scalarisation by a weight vector, Pareto-front tools."""

from alignax.pareto.front import hypervolume, non_dominated, weight_grid
from alignax.pareto.loss import multi_reward_loss, resolve_config
from alignax.pareto.normalize import init_state, normalize, validate_specs
from alignax.pareto.scalarize import (
    ideal_point,
    scalarize,
    update_ideal,
    validate_ideal,
    validate_weights,
)

__all__ = [
    "hypervolume", "ideal_point", "init_state", "multi_reward_loss", "non_dominated", "normalize", "resolve_config",
    "scalarize", "update_ideal", "validate_ideal", "validate_specs", "validate_weights", "weight_grid",
]
