"""``params.yaml`` validated: one pydantic model per section, every derived config built.

:func:`load_settings` is what every stage and the Prefect flow call before doing anything;
:func:`load_run_config` gives a new user the pipeline's LEO config of one run.
"""

from leo.settings.params import (
    Settings,
    load_run_config,
    load_settings,
    params_path,
    parse_settings,
    read_yaml,
)

__all__ = [
    "Settings",
    "load_run_config",
    "load_settings",
    "params_path",
    "parse_settings",
    "read_yaml",
]
