"""Configuration values checked before anything is built or written: per-axis options given one value are
repeated, and every value that cannot work (data, model, trainer) is one ConfigError naming the key set."""

from __future__ import annotations

from typing import Any

from ..data.contract import check_data_values, per_axis
from ..errors import ConfigError
from ..masking import check_mask_ratio
from ..train.optim import check_optim_values

__all__ = ["check_config_values", "PER_AXIS_KEYS"]

PER_AXIS_KEYS = ("data.init_args.roi_size", "data.init_args.spacing", "model.init_args.input_size",
                 "model.init_args.roi_size")


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    return value.as_dict() if hasattr(value, "as_dict") else dict(value)


def check_config_values(config: Any) -> None:
    """Repeat one-value per-axis options per axis of ``model.init_args.spatial_dims``, then refuse a value that
    cannot work: the data module's (batch, samples, crop size, spacing, intensity window), the model's
    (``mask_ratio`` outside (0, 1), a non-positive lr), the trainer's (``max_steps``/``max_epochs`` 0 or < -1)."""
    dims = config.get("model.init_args.spatial_dims")
    dims = dims if isinstance(dims, int) else 3
    for key in PER_AXIS_KEYS:
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            config[key] = per_axis(value, dims)
    check_data_values(_as_dict(config.get("data.init_args")))
    model = _as_dict(config.get("model.init_args"))
    if "mask_ratio" in model:
        check_mask_ratio(model["mask_ratio"], "model.init_args.mask_ratio")
    check_optim_values(model)
    for key in ("max_steps", "max_epochs"):
        value = config.get(f"trainer.{key}")
        if value is not None and (value == 0 or value < -1):
            raise ConfigError(f"trainer.{key} is {value}; expected a count >= 1 (or -1: no limit): {value} would "
                              "train nothing and leave an untrained model")
