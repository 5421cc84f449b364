"""Device profiles: hardware description, the catalogue of device classes, the cost model.

Imports numpy only. Where things live:

- ``_errors``: ``FleetlearnError`` (the project's exception base), ``ConfigError``,
  ``ProfileError``.
- ``_profile``: ``DeviceProfile``, ``Availability``, ``AvailabilityKind``,
  ``PowerSource``, ``dumps_toml`` (the small TOML writer).
- ``_schema``: ``profile_schema`` (the JSON Schema of a profile in a hello).
- ``_catalogue``: ``load_catalogue``, ``get_profile``, ``load_profile_file``,
  ``parse_mix``, ``profile_mix``, ``DEFAULT_MIX`` (bundled ``catalogue/*.toml``).
- ``_cost``: ``Task``, ``CostBreakdown``, ``predict``, ``transfer_time_s``,
  ``step_time_s``, ``calibrate``, ``CorrectionEstimator``, ``ReferenceModel``,
  ``REFERENCE_MODELS``, ``reference_model``, ``train_flops_per_sample``,
  ``dense_macs``, ``dense_params``, ``conv1d_out_len``.
- ``_measure``: ``measure_machine``, ``measure_gemm``, ``GemmResult``,
  ``register_throughput_probe``, ``ThroughputProbe``, ``cpu_count``, ``memory_mb``,
  ``storage_gb``.
- ``_cli``: the ``fleetlearn profile`` subcommand.
- ``_settings``, ``_settings_section``, ``_settings_cli``: the settings mechanism of
  every command: ``Section``, ``setting``, ``group``, ``overrides``, ``internal``,
  ``Meta``, ``Resolved``, ``Source``, ``show_config``, ``CONFIG_ENV``.
"""

from device_profiles._catalogue import (
    DEFAULT_MIX,
    get_profile,
    load_catalogue,
    load_profile_file,
    parse_mix,
    profile_mix,
)
from device_profiles._cost import (
    REFERENCE_MODELS,
    CorrectionEstimator,
    CostBreakdown,
    ReferenceModel,
    Task,
    calibrate,
    conv1d_out_len,
    dense_macs,
    dense_params,
    predict,
    reference_model,
    step_time_s,
    train_flops_per_sample,
    transfer_time_s,
)
from device_profiles._errors import ConfigError, FleetlearnError, ProfileError
from device_profiles._measure import (
    GemmResult,
    ThroughputProbe,
    cpu_count,
    measure_gemm,
    measure_machine,
    memory_mb,
    register_throughput_probe,
    storage_gb,
)
from device_profiles._profile import (
    Availability,
    AvailabilityKind,
    DeviceProfile,
    PowerSource,
    dumps_toml,
)
from device_profiles._schema import profile_schema

# The settings mechanism (flags > environment > file > defaults, for every command).
from device_profiles._settings import CONFIG_ENV, Meta, Source, group, internal, overrides, setting
from device_profiles._settings_cli import show_config
from device_profiles._settings_section import Resolved, Section

__all__ = [
    "DEFAULT_MIX",
    "REFERENCE_MODELS",
    "Availability",
    "AvailabilityKind",
    "ConfigError",
    "CorrectionEstimator",
    "CostBreakdown",
    "DeviceProfile",
    "FleetlearnError",
    "GemmResult",
    "PowerSource",
    "ProfileError",
    "ReferenceModel",
    "Task",
    "ThroughputProbe",
    "calibrate",
    "conv1d_out_len",
    "cpu_count",
    "dense_macs",
    "dense_params",
    "dumps_toml",
    "get_profile",
    "load_catalogue",
    "load_profile_file",
    "measure_gemm",
    "measure_machine",
    "memory_mb",
    "parse_mix",
    "predict",
    "profile_schema",
    "profile_mix",
    "reference_model",
    "register_throughput_probe",
    "step_time_s",
    "storage_gb",
    "train_flops_per_sample",
    "transfer_time_s",
]
__all__ += ["CONFIG_ENV", "Meta", "Resolved", "Section", "Source", "group", "internal", "overrides", "setting", "show_config"]  # noqa: E501  (settings)
