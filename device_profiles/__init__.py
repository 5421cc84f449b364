"""Device profiles: hardware description, the catalogue of device classes, the cost model.

Imports numpy only. Where things live:

- ``_errors``: ``FleetlearnError`` (the project's exception base), ``ConfigError``,
  ``ProfileError``.
"""

from device_profiles._errors import ConfigError, FleetlearnError, ProfileError

__all__ = ["ConfigError", "FleetlearnError", "ProfileError"]
