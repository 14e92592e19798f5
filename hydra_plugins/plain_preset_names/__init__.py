"""A Hydra plugin that keeps `-S preset=NAME` inside conf/.

Hydra resolves a config-group choice as a path under the group's folder, so
`-S preset=../../somewhere/file` would load a YAML file from anywhere on the disk. DVC loads
the plugins of `hydra_plugins/` at the repo root when it composes params.yaml; this one
serves conf/ through a config source that treats a choice with a `..` part as not found, so
Hydra refuses it with its own message, which lists the presets there are.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.config_source import ConfigLoadError, ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin


def _leaves_the_folder(config_path: str) -> bool:
    return ".." in PurePosixPath(config_path).parts


class PlainNamesConfigSource(FileConfigSource):
    """conf/ as Hydra's file source reads it, minus every path that climbs out."""

    @staticmethod
    def scheme() -> str:
        return "plain-names-file"

    def is_config(self, config_path: str) -> bool:
        return not _leaves_the_folder(config_path) and super().is_config(config_path)

    def is_group(self, config_path: str) -> bool:
        return not _leaves_the_folder(config_path) and super().is_group(config_path)

    def load_config(self, config_path: str) -> ConfigResult:
        if _leaves_the_folder(config_path):
            raise ConfigLoadError(f"{config_path}: a choice is a plain name, not a path")
        return super().load_config(config_path)


class PlainNamesSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for element in search_path.get_path():
            # The primary config folder: a bare path (initialize_config_dir) or file://.
            if element.provider == "main" and "://" not in element.path.removeprefix("file://"):
                folder = element.path.removeprefix("file://")
                element.path = f"{PlainNamesConfigSource.scheme()}://{folder}"
