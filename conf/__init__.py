"""Hydra configuration of rf2 (installed as ``rf2.conf``).

Importing this package registers ``rf2_defaults`` — every field of ``rf2.core.config.RunConfig``
with its default — as the first entry of ``config.yaml``'s defaults list, so any field
can be overridden from the command line without ``+`` even when no YAML mentions it.
Types and ranges are checked afterwards by ``rf2.core.config.load_run_config``.
"""

from hydra.core.config_store import ConfigStore

from rf2.core.config import RunConfig
from rf2.core.typed import to_dict

ConfigStore.instance().store(name="rf2_defaults", node=to_dict(RunConfig()))
