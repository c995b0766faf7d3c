"""Config values checked and configs built: `check_values` (each config class's range checks, in its `__post_init__`)
and `build` (Hydra's `instantiate`, after every option is checked against its target's annotations,
`pipelines/option_types.py`, and without hiding the user errors a target raises).
"""

from __future__ import annotations

from typing import Any

from pipelines.errors import ConfigError, UserError
from pipelines.option_types import check_option_types


def check_values(section: str, config: Any, *, positive: tuple[str, ...] = (), at_least_zero: tuple[str, ...] = (),
                 fraction: tuple[str, ...] = (), resolution: tuple[str, ...] = ()) -> None:
    """Raise `ConfigError` naming `<section>.<field>` for the first field of `config` out of its range: `positive`
    (> 0), `at_least_zero` (>= 0), `fraction` (in (0, 1]), `resolution` (None, or a positive whole number of pixels;
    whether it fits the model, `pipelines/geometry.py` checks from the model's config before any weights load). None
    is accepted where a field may be None."""
    rules = [(positive, lambda v: v > 0, "a positive number"), (at_least_zero, lambda v: v >= 0, "0 or more"),
             (fraction, lambda v: 0 < v <= 1, "in (0, 1]"),
             (resolution, lambda v: v > 0 and v == int(v), "a positive whole number of pixels")]
    for names, valid, meaning in rules:
        for name in names:
            value = getattr(config, name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and valid(value)):
                raise ConfigError(f"{section}.{name} must be {meaning}, got {value!r}")


def config_section(config: Any) -> str:
    """The dotted name of a config node in its root config (`algo`, `prompts.train`), or "config" for a plain dict."""
    try:
        return config._get_full_key(None) or "config"
    except AttributeError:
        return "config"


def build(config: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, except that every option is first checked against its target's annotations
    (`pipelines/option_types.py`), and a user error raised by any (nested) target reaches the caller as itself rather
    than wrapped in Hydra's `InstantiationException`, so that it can be reported in one line."""
    from hydra.errors import InstantiationException  # here, so that `import pipelines` does not load Hydra
    from hydra.utils import instantiate

    check_option_types(config, config_section(config))
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise
