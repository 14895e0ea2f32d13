"""Registers quantbuild's structured-config schema with Hydra wherever Hydra loads plugins.

DVC composes `conf/` itself on `dvc exp run` and scans `hydra_plugins` under the repo root
(its `hydra.plugins_path`); importing this module puts the schema into the ConfigStore so
`conf/config.yaml` can name it in its defaults list.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from quantbuild.config import register

register()


class QuantbuildSchemaPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        """No extra search path: this plugin exists to register the schema on import."""
