"""The model repository on disk: which models exist, under which names, and which of them a
request or the start-up set means. One instance serves reward models and policies alike."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rewardserve.config import Settings
from rewardserve.registry.manifest import (
    MANIFEST_NAME,
    ManifestError,
    ModelManifest,
    load_manifest,
    resolve_source,
)
from rewardserve.rewards.spec import CompositeSpec
from rewardserve.schemas.errors import InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

Kind = Literal["reward", "policy"]


@dataclass(frozen=True)
class Entry:
    folder: Path
    manifest: ModelManifest | None
    error: str | None = None


@dataclass(frozen=True)
class _Words:
    noun: str
    field: str
    """The request field that names a model of this kind."""


WORDS: dict[Kind, _Words] = {
    "reward": _Words("reward model", "model"),
    "policy": _Words("policy", "policy"),
}


def _refuse_clashing_aliases(entries: dict[str, Entry]) -> None:
    """An alias that is another model's name, or another model's alias too, makes a request
    under it ambiguous: every model claiming it is kept as a bad manifest, not served."""
    claims: dict[str, list[str]] = {}
    for name, e in entries.items():
        for alias in e.manifest.aliases if e.manifest else ():
            claims.setdefault(alias, []).append(name)
    for alias, names in claims.items():
        if alias not in entries and len(names) == 1:
            continue
        for name in names:
            if alias in entries:
                why = f"'{alias}' is the name of another model"
            else:
                others = ", ".join(f"'{n}'" for n in names if n != name)
                why = f"'{alias}' is also an alias of {others}"
            err = ManifestError(entries[name].folder / MANIFEST_NAME, "aliases", why)
            log.error("skipping model: %s", err)
            entries[name] = Entry(entries[name].folder, None, str(err))


def scan_repository(root: Path) -> dict[str, Entry]:
    """Every sub-folder with a model.yaml; a bad manifest is kept as an error, not fatal."""
    entries: dict[str, Entry] = {}
    if not root.is_dir():
        log.warning("model repository %s does not exist", root)
        return entries
    for folder in sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file()):
        try:
            entries[folder.name] = Entry(folder, load_manifest(folder))
        except ManifestError as e:
            log.error("skipping model: %s", e)
            entries[folder.name] = Entry(folder, None, str(e))
    _refuse_clashing_aliases(entries)
    return entries


def _names(loaded: Collection[str]) -> str:
    return ", ".join(sorted(loaded)) or "none"


class ModelRepository:
    """Names, the start-up set and the default of each kind, asked by the scoring engine and
    the policy manager alike; what is loaded stays with them and is passed in."""

    def __init__(
        self,
        root: Path,
        cache_dir: Path,
        *,
        startup: Mapping[Kind, Sequence[str]] | None = None,
        defaults: Mapping[Kind, str | None] | None = None,
    ) -> None:
        self.root, self.cache_dir = root, cache_dir
        self._startup = dict(startup or {})
        self._defaults = dict(defaults or {})
        self.entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}
        self.rescan()

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRepository:
        return cls(
            settings.model_repository,
            settings.cache_dir,
            startup={"reward": settings.models, "policy": settings.policies},
            defaults={"reward": settings.default_model},
        )

    def rescan(self) -> None:
        """Read the repository again (new folders, edited manifests)."""
        self.entries = scan_repository(self.root)
        self._aliases = {
            alias: name
            for name, e in self.entries.items()
            if e.manifest is not None
            for alias in e.manifest.aliases
        }

    def canonical(self, name: str) -> str:
        """The model's own name for a name or alias; other strings come back unchanged."""
        return self._aliases.get(name, name)

    def of_kind(self, kind: Kind) -> dict[str, Entry]:
        """The models of one kind whose manifests are valid."""
        return {
            n: e
            for n, e in self.entries.items()
            if e.manifest is not None and e.manifest.kind == kind
        }

    def startup_set(self, kind: Kind) -> list[str]:
        """The names asked for (--models, --policies), else every model of the kind whose
        weights are present; missing ones are logged (`make models` builds them)."""
        if self._startup.get(kind):
            return [self.canonical(n) for n in self._startup[kind]]
        names = []
        for name in self.of_kind(kind):
            why = self.unservable(name)
            if why is None:
                names.append(name)
            else:
                log.warning("not loading %s: %s", name, why)
        return names

    def unservable(self, name: str) -> str | None:
        """Why a model of the repository cannot load as it stands (asked when needed, so a
        model whose weights were built since is not refused on an old reason)."""
        e = self.entries.get(name)
        if e is None or e.manifest is None:
            return None
        if e.manifest.composite is not None:  # servable when every part's model is
            return self._unservable_parts(e.manifest.composite)
        try:
            present = resolve_source(e.manifest, e.folder, self.cache_dir).is_dir()
        except ManifestError as err:
            return str(err)
        if present:
            return None
        return "its weights are not built (`make models`, or the make target its model.yaml names)"

    def composite_problem(self, spec: CompositeSpec) -> str | None:
        """Why the model parts of `spec` cannot be served from this repository, or None.

        Each must name a reward model of the repository (name or alias) that is not itself a
        composite: parts never nest, so a composite can neither contain itself nor a cycle."""
        for part in spec.model_parts:
            assert part.model is not None
            name = self.canonical(part.model)
            entry = self.entries.get(name)
            where = f"part '{part.name}'"
            if entry is None:
                return f"{where}: no reward model '{part.model}' in the repository"
            if entry.manifest is None:
                return f"{where}: reward model '{name}' has a bad manifest: {entry.error}"
            if entry.manifest.kind != "reward":
                return f"{where}: '{name}' is a {entry.manifest.kind}, not a reward model"
            if entry.manifest.composite is not None:
                return (
                    f"{where}: '{name}' is a composite; a composite's parts are reward models "
                    "and rules, not other composites"
                )
        return None

    def _unservable_parts(self, spec: CompositeSpec) -> str | None:
        why = self.composite_problem(spec)
        if why:
            return why
        for part in spec.model_parts:
            assert part.model is not None
            part_why = self.unservable(self.canonical(part.model))
            if part_why:
                return f"part '{part.name}' ({part.model}): {part_why}"
        return None

    def default_name(self, kind: Kind, loaded: Collection[str]) -> str | None:
        """The configured default, else the model of this kind whose manifest says default,
        else the only loaded one. Never silently another model when the default is unloaded."""
        configured = self._defaults.get(kind)
        if configured:
            return self.canonical(configured)
        marked = [n for n, e in self.of_kind(kind).items() if e.manifest and e.manifest.default]
        if marked:
            return marked[0]
        return next(iter(loaded)) if len(loaded) == 1 else None

    def resolve(
        self,
        kind: Kind,
        name: str | None,
        loaded: Collection[str],
        failures: Mapping[str, str] | None = None,
    ) -> str:
        """The loaded model a request means by `name` (a name, an alias or None for the
        default), or the error that says why there is none. `failures`: the caller's load
        errors, reported as the reason a model is not available (a 503, not a 404)."""
        words = WORDS[kind]
        failures = failures or {}
        if name is None:
            name = self.default_name(kind, loaded)
            if name is None:
                raise InvalidArgument(
                    f"no default {words.noun}; name one of: {_names(loaded)}", field=words.field
                )
            if name not in loaded:
                why = failures.get(name) or self.unservable(name)
                raise Unavailable(
                    f"the default {words.noun} '{name}' is not loaded" + (f": {why}" if why else "")
                )
            return name
        name = self.canonical(name)
        if name in loaded:
            return name
        why = failures.get(name) or self.unservable(name)
        if why and name in self.of_kind(kind):
            raise Unavailable(f"{words.noun} '{name}' is not available: {why}")
        raise NotFound(
            f"{words.noun} '{name}' is not loaded (loaded: {_names(loaded)})", field=words.field
        )
