"""Sites: which site a film came from, from the path it was registered under.

A site is a name with its sources: drop-folder path prefixes and DICOM calling AE titles
(``site_sources``). The DICOM listener names each received file after the calling AE title
(:func:`received_file_name`), so both kinds of source are read from the path alone:

1. a film the listener received from a configured calling AE title belongs to that AE's site;
2. else the film belongs to the site with the longest folder prefix of its path;
3. else to :data:`DEFAULT_SITE`.

A film's site is recorded once, when it is registered (``images.site``); adding a site also moves
the films of ``default`` that its sources cover (:func:`assign_existing`), so sites can be set up
after films arrived. Removing a site leaves its films' site as it was (their history stays theirs).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.paths import from_db_one
from db.schema import Image, Site, SiteSource, SourceFile, SourceKind

DEFAULT_SITE = "default"
#: A site name: short, no spaces, safe in a URL, a Prometheus label and a file name.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: The name of a file the DICOM listener wrote: ``<32 hex>.ae-<quoted calling AE title>.dcm``.
RECEIVED = re.compile(r"^[0-9a-f]{32}\.ae-(?P<aet>[A-Za-z0-9%._~-]{1,64})\.dcm$")


class SiteError(ValueError):
    """A site cannot be stored as asked (clear message for the user)."""


def received_file_name(digest: str, calling_ae: str | None) -> str:
    """The name under which the listener stores a received file (``digest``: 32 hex characters).

    The calling AE title is kept in the name, quoted (an AE title may hold spaces or a slash), so
    the site of the file is known from its path like that of a file dropped into a folder.
    """
    title = (calling_ae or "").strip()
    if not title:
        return f"{digest}.dcm"
    return f"{digest}.ae-{quote(title, safe='')}.dcm"


def calling_ae_of(path: str) -> str | None:
    """The calling AE title of a file the listener received (None for any other file)."""
    match = RECEIVED.match(os.path.basename(path))
    return unquote(match["aet"]) if match else None


def normal_folder(folder: str | Path) -> str:
    """A folder source as stored: absolute, symbolic links resolved (as ``scan`` and ``watch`` see paths)."""
    return str(Path(folder).expanduser().resolve())


def normal_ae(title: str) -> str:
    title = title.strip()
    if not title or len(title) > 16 or "\\" in title or any(ord(c) < 32 for c in title):
        raise SiteError(f"{title!r} is not a DICOM AE title (1 to 16 characters, no backslash)")
    return title


@dataclass(frozen=True)
class SiteRules:
    """The configured sources, ready to resolve paths (load once per batch with :func:`load_rules`)."""

    folders: tuple[tuple[str, str], ...] = ()  # (prefix, site), longest prefix first
    calling_aes: dict[str, str] = field(default_factory=dict)

    def site_of(self, path: str) -> str:
        title = calling_ae_of(path)
        if title is not None and title in self.calling_aes:
            return self.calling_aes[title]
        for prefix, site in self.folders:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return site
        return DEFAULT_SITE


def load_rules(session: Session) -> SiteRules:
    folders, aes = [], {}
    for source in session.scalars(select(SiteSource)):
        if source.kind == SourceKind.FOLDER:
            folders.append((source.value, source.site))
        else:
            aes[source.value] = source.site
    folders.sort(key=lambda pair: len(pair[0]), reverse=True)
    return SiteRules(tuple(folders), aes)


@dataclass(frozen=True)
class SiteInfo:
    name: str
    folders: list[str]
    calling_aes: list[str]
    films: int


def add_site(
    session: Session, name: str, folders: Sequence[str | Path] = (), calling_aes: Sequence[str] = ()
) -> int:
    """Create site ``name`` (or add sources to it); returns how many existing films moved to it."""
    if not NAME.match(name):
        raise SiteError("a site name is 1 to 64 letters, digits, '.', '_' or '-', from a letter or digit")
    if name == DEFAULT_SITE:
        raise SiteError(f"{DEFAULT_SITE!r} is for films from no configured source; it takes no sources")
    wanted = [(SourceKind.FOLDER, normal_folder(f)) for f in folders]
    wanted += [(SourceKind.CALLING_AE, normal_ae(t)) for t in calling_aes]
    site = session.get(Site, name) or Site(name=name)
    session.add(site)
    for kind, value in wanted:
        owner = session.scalar(
            select(SiteSource.site).where(SiteSource.kind == kind, SiteSource.value == value)
        )
        if owner is not None and owner != name:
            raise SiteError(f"that {kind.replace('_', ' ')} already belongs to site {owner!r}")
        if owner is None:
            session.add(SiteSource(site=name, kind=kind, value=value))
    session.flush()
    return assign_existing(session, load_rules(session))


def remove_site(session: Session, name: str) -> None:
    """Forget site ``name`` and its sources (its films keep their site; new ones resolve without it)."""
    site = session.get(Site, name)
    if site is None:
        raise SiteError(f"no site named {name!r}")
    session.delete(site)
    session.flush()


def list_sites(session: Session) -> list[SiteInfo]:
    """Every configured site, and ``default``, with its sources and film count (by name)."""
    counts = dict(session.execute(select(Image.site, func.count()).group_by(Image.site)).all())
    out = [SiteInfo(DEFAULT_SITE, [], [], counts.get(DEFAULT_SITE, 0))]
    for site in session.scalars(select(Site).order_by(Site.name)):
        out.append(
            SiteInfo(
                site.name,
                [s.value for s in site.sources if s.kind == SourceKind.FOLDER],
                [s.value for s in site.sources if s.kind == SourceKind.CALLING_AE],
                counts.get(site.name, 0),
            )
        )
    return out


def site_names(session: Session) -> list[str]:
    """Every site a film or a source names, ``default`` first (for filters and reports)."""
    named = set(session.scalars(select(Site.name))) | set(session.scalars(select(Image.site).distinct()))
    named.discard(DEFAULT_SITE)
    return [DEFAULT_SITE, *sorted(named)]


def assign_existing(session: Session, rules: SiteRules) -> int:
    """Films of ``default`` whose first known path a source now covers move to that site."""
    first_paths = (
        select(SourceFile.image_id, SourceFile.path)
        .join(Image, Image.id == SourceFile.image_id)
        .where(Image.site == DEFAULT_SITE)
        .order_by(SourceFile.image_id, SourceFile.id)
    )
    seen: set[int] = set()
    moves: dict[str, list[int]] = {}
    for image_id, stored in session.execute(first_paths):
        if image_id in seen:
            continue
        seen.add(image_id)
        site = rules.site_of(from_db_one(stored))
        if site != DEFAULT_SITE:
            moves.setdefault(site, []).append(image_id)
    for site, ids in moves.items():
        for chunk in _chunks(ids, 500):
            session.execute(update(Image).where(Image.id.in_(chunk)).values(site=site))
    return sum(len(ids) for ids in moves.values())


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
