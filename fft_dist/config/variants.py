"""A config group whose chosen option has its own schema (``launcher=slurm``, ``optimizer=sgd``): one
mechanism for every such group.

Why: an option that only another choice reads would be silently ignored. Each option of the group is
a dataclass extending the group's base (the fields every option has), added with :meth:`Variants.add`;
the section's field in :class:`~fft_dist.config.FFTConfig` carries the group in its metadata
(``metadata={"variants": ...}``). From that one registry:

- composing stores each schema for Hydra as ``<section>_schema/<name>``, and the option's yaml names it
  in its defaults list (``- /<section>_schema/<name>@_here_``), so Hydra refuses another option's key
  while composing (a group file of your own keeps that line of the file it copies);
- :meth:`Variants.typed` builds the chosen option's dataclass (by the section's ``name``) from what a
  written config.yaml or Python code holds, and refuses what slips past Hydra (``+key=...``) by name;
- ``fft-dist train --help`` lists each option's own fields under its option.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fft_dist.errors import ConfigError


def plain(name: Any) -> str:
    """An option name as text (an Enum member gives its value)."""
    return str(getattr(name, "value", name))


def field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


@dataclass
class Variants:
    """The options of one config group, each with its own dataclass; ``name`` in the section picks it."""

    section: str
    """The FFTConfig field and the Hydra group (launcher, optimizer)."""
    base: type
    """The fields every option has; the schema of an option no module added (its yaml then lists only these)."""
    schemas: dict[str, type] = field(default_factory=dict)

    @property
    def store_group(self) -> str:
        """The Hydra ConfigStore group that holds the schemas (``- /<this>/<name>@_here_`` in a yaml)."""
        return f"{self.section}_schema"

    @property
    def default(self) -> str:
        """The option a section without ``name`` means: the base schema's default."""
        return plain(next(f.default for f in dataclasses.fields(self.base) if f.name == "name"))

    def add(self, name: str, schema: type) -> None:
        """Make `schema` the options of ``<section>=<name>`` (the one way an option is added)."""
        if not (isinstance(schema, type) and dataclasses.is_dataclass(schema) and issubclass(schema, self.base)):
            raise TypeError(f"{self.section}={name}: its schema must be a dataclass extending {self.base.__name__}")
        self.schemas[plain(name)] = schema

    def schema(self, name: Any) -> type:
        """The dataclass of option `name`; the base for a name no module added (the registry that runs
        the option refuses that name with its own message)."""
        return self.schemas.get(plain(name), self.base)

    def owners(self, key: str) -> list[str]:
        """The options that have ``<section>.<key>``."""
        return [n for n, s in self.schemas.items() if key in field_names(s)]

    def not_an_option(self, key: str, name: str) -> ConfigError:
        """``<section>.<key>`` is not an option of ``<section>=<name>``: the error, naming who has it."""
        owners = self.owners(key)
        where = f"an option of {self.section}={'|'.join(owners)}" if owners else f"no {self.section} has it"
        hint = "" if plain(name) in self.schemas else (  # a group file of your own that names no schema
            f"; a group file of your own names its option's schema as the file it copies does: "
            f"defaults: [/{self.store_group}/<name>@_here_, _self_]")
        return ConfigError(f"{self.section}.{key} is not an option of {self.section}={name} ({where}; "
                           f"{self.section}={name} has {', '.join(field_names(self.schema(name)))}); it would be "
                           f"ignored, so it is refused{hint}")

    def check_keys(self, keys, name: Any) -> None:
        """Refuse the first of `keys` that option `name`'s schema lacks."""
        own = set(field_names(self.schema(name)))
        for key in keys:
            if key not in own:
                raise self.not_an_option(str(key), plain(name))

    def name_of(self, node: Any) -> str:
        """The option a section (a mapping or DictConfig) names."""
        return plain(node.get("name", self.default)) if hasattr(node, "get") else self.default

    def typed(self, value: Any) -> Any:
        """The chosen option's dataclass, built from `value` (a mapping, a DictConfig, or a dataclass that
        Python code made or changed); a key that option lacks, or a value of the wrong type, is a ConfigError
        naming it."""
        if isinstance(value, self.base):
            own = field_names(type(value))
            extra = sorted(set(vars(value)) - set(own))  # set after __init__ (a `+key` typed loosely)
            if type(value) is self.schema(value.name) and not extra:
                return value
            value = {**{k: getattr(value, k) for k in own}, **{k: vars(value)[k] for k in extra}}
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        if not isinstance(value, dict):
            value = OmegaConf.to_container(OmegaConf.create(value))  # a DictConfig or mapping
        name = self.name_of(value)
        self.check_keys(value, name)
        try:
            node = OmegaConf.merge(OmegaConf.structured(self.schema(name)), value)
        except OmegaConfBaseException as e:  # a value of the wrong type: name the option
            raise ConfigError(f"{self.section}.{getattr(e, 'key', None) or '?'}: {str(e).splitlines()[0]}") from None
        return OmegaConf.to_object(node)


def variant_fields(cls: type) -> list[tuple[str, Variants]]:
    """The sections of dataclass `cls` whose options each have their own schema, with their groups."""
    return [(f.name, f.metadata["variants"]) for f in dataclasses.fields(cls) if "variants" in f.metadata]
