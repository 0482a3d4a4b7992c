"""docs/threat-model.md names a test for each claim: every test it names must exist.

A claim whose test was renamed or deleted would silently lose its proof; this keeps
the document and the suite together. Names are ``file.py::test_name`` (``...::`` and a
bare ``::test_name`` refer to the file named before them) and bare file names, found
anywhere below ``tests/`` (``unit/``, ``integration/``).
"""

from __future__ import annotations

import re
from pathlib import Path

from paths import REPO as ROOT

DOC = (ROOT / "docs" / "threat-model.md").read_text()
REF = re.compile(r"`((?:[\w/]+\.py)|\.\.\.)?(::\w+)?`")


def _test_names(path: Path) -> set[str]:
    return set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))


def test_every_named_test_file_and_function_exists() -> None:
    last: Path | None = None
    checked = 0
    for match in REF.finditer(DOC):
        file, func = match.group(1), match.group(2)
        if file and file != "...":
            if not file.startswith(("reliability/", "test_")) and "/" not in file:
                continue  # a module of the package, not a test
            if not (file.startswith("test_") or file.startswith("reliability/")):
                continue
            found = [
                p for p in (ROOT / "tests").rglob(Path(file).name) if p.as_posix().endswith(file)
            ]
            assert len(found) == 1, f"threat-model.md names {file}: found {found}"
            path = found[0]
            last = path
            checked += 1
        if func:
            assert last is not None, f"{func} names no file before it"
            assert func[2:] in _test_names(last), f"{last.name} has no {func[2:]}"
            checked += 1
    assert checked > 40  # the document really is tied to the suite
