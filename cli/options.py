"""What the options of every `sealstream` command share: kebab-case flags, and SEALSTREAM_*
variables that set only the options a command lets them set."""

from collections.abc import Collection
from typing import ClassVar

from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class CommandOptions(BaseSettings):
    """A command's options. Only those named in `from_environment` come from SEALSTREAM_*
    variables (all of them if it is None): a variable left in the environment must not
    change what a command is told to do on its command line."""

    model_config = SettingsConfigDict(env_prefix="SEALSTREAM_", cli_kebab_case=True, extra="ignore")

    from_environment: ClassVar[Collection[str] | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if cls.from_environment is None:
            return init_settings, env_settings, dotenv_settings, file_secret_settings
        return init_settings, _EnvironmentOf(settings_cls, cls.from_environment)


class _EnvironmentOf(EnvSettingsSource):
    """The SEALSTREAM_* variables of the options in `names` alone."""

    def __init__(self, settings_cls: type[BaseSettings], names: Collection[str]) -> None:
        super().__init__(settings_cls)
        self._names = names

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[object, str, bool]:
        if field_name not in self._names:
            return None, field_name, False
        return super().get_field_value(field, field_name)
