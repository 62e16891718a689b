"""What is installed beside Drip: no copyleft licence anywhere in its environment, and one OpenCV.

Drip is used in closed and commercial products, so nothing it installs may be under the GPL or
the AGPL (Ultralytics, AlbumentationsX, cleanlab are AGPL: peers to measure against in a venv of
their own, never installed here). The YOLOX package asks for the GUI build of OpenCV while Drip
has the headless one; it is installed without its dependencies, and only one ``cv2`` may be
present (two distributions would overwrite each other's files).
"""

from __future__ import annotations

import importlib.metadata as metadata
import re

# GPL or AGPL, any version, by SPDX id or by name; not the LGPL ("Lesser"), whose terms allow linking.
COPYLEFT = re.compile(r"(?<![L\w-])A?GPL|GNU (Affero )?General Public License", re.IGNORECASE)


def declared_licences(dist: metadata.Distribution) -> list[str]:
    """The licence a distribution declares: its SPDX expression, its trove classifiers, and its
    License field where that is a name (a field holding a whole licence text is not a name: it may
    quote other licences, as SciPy's lists those of its bundled runtime libraries)."""
    meta = dist.metadata
    found = [meta.get("License-Expression") or ""]
    found += [c for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
    field = (meta.get("License") or "").strip()
    if field and "\n" not in field and len(field) < 200:
        found.append(field)
    return [text for text in found if text]


def copyleft(texts: list[str]) -> list[str]:
    return [text for text in texts if COPYLEFT.search(text) and "lesser" not in text.lower()]


def test_the_rule_tells_copyleft_from_permissive():
    assert copyleft(["AGPL-3.0"]) and copyleft(["GPL-3.0-or-later"])
    assert copyleft(["License :: OSI Approved :: GNU Affero General Public License v3"])
    assert copyleft(["MIT OR GPL-2.0"])  # a choice that includes the GPL is flagged, to be looked at
    assert not copyleft(["LGPL-2.1"])
    assert not copyleft(["License :: OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)"])
    assert not copyleft(["Apache-2.0", "BSD-3-Clause", "License :: OSI Approved :: MIT License"])


def test_no_installed_distribution_is_gpl_or_agpl():
    offenders = []
    for dist in metadata.distributions():
        flagged = copyleft(declared_licences(dist))
        if flagged:
            offenders.append(f"{dist.metadata['Name']} {dist.version} ({'; '.join(flagged)})")
    assert not offenders, f"copyleft packages in Drip's environment: {', '.join(sorted(offenders))}"


def test_ultralytics_is_not_installed():
    names = {(d.metadata["Name"] or "").lower() for d in metadata.distributions()}
    assert not names & {"ultralytics", "albumentationsx", "cleanlab"}, names & {"ultralytics", "albumentationsx", "cleanlab"}


def test_exactly_one_opencv_distribution_and_it_is_headless():
    opencv = sorted({(d.metadata["Name"] or "").lower() for d in metadata.distributions()
                     if (d.metadata["Name"] or "").lower().startswith("opencv")})
    assert opencv == ["opencv-python-headless"], f"OpenCV distributions installed: {opencv}; want only opencv-python-headless"


def test_yolox_imports_with_the_headless_opencv():
    import cv2
    import yolox.models  # noqa: F401 - installed with --no-deps by scripts/setup.sh and the Dockerfile

    gui = re.search(r"GUI:\s*(\S+)", cv2.getBuildInformation())
    assert gui is not None and gui.group(1) == "NONE", f"cv2 has a GUI ({gui and gui.group(1)}): not the headless wheel"
