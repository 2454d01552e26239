"""License normalisation to SPDX identifiers, and the allow-list decision.

Registries let authors declare licenses as free text ("Apache 2", "MIT License",
"BSD"), so every declaration is first mapped to SPDX ids; only then can a configurable
allow-list decide what may be trained on. A declaration may list several licenses or an
SPDX expression: `OR` (and a plain list, as Hex's `licenses` means a choice) needs one
allowed alternative, `AND` needs all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from exforge.core.db import LicenseOutcome

# Free-text spellings seen in registries → SPDX id (keys are normalised by `_key`).
ALIASES: dict[str, str] = {
    "mit": "MIT",
    "expat": "MIT",
    "mit0": "MIT-0",
    "apache": "Apache-2.0",
    "apache2": "Apache-2.0",
    "apache20": "Apache-2.0",
    "apachev2": "Apache-2.0",
    "apachev20": "Apache-2.0",
    "asl2": "Apache-2.0",
    "asl20": "Apache-2.0",
    "bsd": "BSD-3-Clause",
    "bsd2": "BSD-2-Clause",
    "bsd2clause": "BSD-2-Clause",
    "simplifiedbsd": "BSD-2-Clause",
    "freebsd": "BSD-2-Clause",
    "bsd3": "BSD-3-Clause",
    "bsd3clause": "BSD-3-Clause",
    "newbsd": "BSD-3-Clause",
    "modifiedbsd": "BSD-3-Clause",
    "isc": "ISC",
    "iscl": "ISC",
    "0bsd": "0BSD",
    "unlicense": "Unlicense",
    "zlib": "Zlib",
    "cc0": "CC0-1.0",
    "cc010": "CC0-1.0",
    "bsl10": "BSL-1.0",
    "boost": "BSL-1.0",
    "mpl2": "MPL-2.0",
    "mpl20": "MPL-2.0",
    "mozillapublic20": "MPL-2.0",
    "epl": "EPL-2.0",
    "epl10": "EPL-1.0",
    "epl20": "EPL-2.0",
    "wtfpl": "WTFPL",
    "gpl": "GPL-3.0-or-later",
    "gpl2": "GPL-2.0-only",
    "gplv2": "GPL-2.0-only",
    "gpl20": "GPL-2.0-only",
    "gpl3": "GPL-3.0-only",
    "gplv3": "GPL-3.0-only",
    "gpl30": "GPL-3.0-only",
    "agpl": "AGPL-3.0-or-later",
    "agpl3": "AGPL-3.0-only",
    "agplv3": "AGPL-3.0-only",
    "agpl30": "AGPL-3.0-only",
    "lgpl": "LGPL-3.0-or-later",
    "lgpl21": "LGPL-2.1-only",
    "lgplv21": "LGPL-2.1-only",
    "lgpl3": "LGPL-3.0-only",
    "lgplv3": "LGPL-3.0-only",
    "lgpl30": "LGPL-3.0-only",
    "ccby40": "CC-BY-4.0",
    "ccbysa40": "CC-BY-SA-4.0",
    "ccbync40": "CC-BY-NC-4.0",
    "ccbyncsa40": "CC-BY-NC-SA-4.0",
}

# SPDX ids written the SPDX way map to themselves (case-insensitively).
_SPDX = sorted(set(ALIASES.values()))
_SPDX_BY_LOWER = {spdx.lower(): spdx for spdx in _SPDX}

_SPLIT = re.compile(r"\s+(?:OR|AND|or|and)\s+|\s*/\s*")


def _key(text: str) -> str:
    """Lower-case letters and digits without filler words: "Apache License, Version 2.0"
    and "apache-2" both become "apache20"/"apache2"."""
    text = text.lower().replace("licence", "license")
    text = re.sub(r"\b(the|gnu|license|licensed|version)\b", "", text)
    return re.sub(r"[^a-z0-9]", "", text)


def normalise(declared: str) -> str | None:
    """The SPDX id for one declared license, or None when it is not recognised."""
    text = declared.strip().strip("()").strip()
    if not text:
        return None
    return _SPDX_BY_LOWER.get(text.lower()) or ALIASES.get(_key(text))


@dataclass(frozen=True)
class LicenseDecision:
    """What a declaration means: its SPDX expression and whether it may be trained on."""

    declared: str | None
    spdx: str | None  # normalised expression, e.g. "MIT OR Apache-2.0"
    allowed: bool
    reason: str | None  # why not allowed: no_license, unknown_license, not_permissive

    @property
    def label(self) -> str:
        """What to record as the source's license downstream."""
        return self.spdx or self.declared or "NOASSERTION"


def decide(declared: str | None, allow: frozenset[str]) -> LicenseDecision:
    """Normalise a declaration and check it against the allow-list."""
    if declared is None or not declared.strip():
        return LicenseDecision(declared, None, False, "no_license")
    allowed_lower = {a.lower() for a in allow}
    conjunctive = re.search(r"\s+(AND|and)\s+", declared) is not None
    parts = [p for p in _SPLIT.split(declared) if p.strip()]
    ids = [normalise(p) for p in parts]
    known = [i for i in ids if i is not None]
    spdx = f" {'AND' if conjunctive else 'OR'} ".join(dict.fromkeys(known)) or None
    if conjunctive:
        if None in ids:
            return LicenseDecision(declared, spdx, False, "unknown_license")
        ok = all(i.lower() in allowed_lower for i in known)
    else:
        ok = any(i.lower() in allowed_lower for i in known)
        if not ok and len(known) < len(ids):
            return LicenseDecision(declared, spdx, False, "unknown_license")
    return LicenseDecision(declared, spdx, ok, None if ok else "not_permissive")


def record_decision(
    engine: Engine, source_id: str, kind: str, package: str, decision: LicenseDecision
) -> None:
    """Keep the decision per source (a redelivery rewrites the same row)."""
    with Session(engine) as session, session.begin():
        session.merge(
            LicenseOutcome(
                source_id=source_id,
                kind=kind,
                package=package,
                declared=(decision.declared or None) and decision.declared[:512],
                spdx=decision.spdx,
                allowed=decision.allowed,
                reason=decision.reason,
            )
        )
