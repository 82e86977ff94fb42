"""docs/compatibility.md is current, and agrees with the libraries the build installs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flexnpu import paths

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gen_compat.py"
DOC = REPO / "docs" / "compatibility.md"
LIBRARIES = ("libascendcl.so", "libopapi.so", "libnnopbase.so")


def doc_rows() -> dict[str, tuple[str, str]]:
    """call -> (library section title, emulator status) from the page as committed."""
    out: dict[str, tuple[str, str]] = {}
    section = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line
        m = re.match(r"\| `(\w+)` \| ([^|]+) \|", line)
        if m:
            out[m.group(1)] = (section, m.group(2).strip())
    return out


def exported(lib: Path) -> set[str]:
    """The functions a library exports (nm -D: defined, text)."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    return {f[2].split("@")[0] for f in (line.split() for line in out.splitlines()) if len(f) == 3 and f[1] in "TtWi"}


def test_the_page_is_what_the_sources_give() -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_page_lists_every_call_of_the_runtime_profiles() -> None:
    from flexnpu.runtimes import ACLNN, ASCEND_RT, ASCENDCL

    rows = doc_rows()
    names = [s.name for p in (ASCENDCL, ASCEND_RT) for s in p.symbols] + \
            [n.name for p in (ASCENDCL, ACLNN) for n in p.namers]
    assert names and not [n for n in names if n not in rows]


@pytest.mark.parametrize("name", LIBRARIES)
def test_every_exported_function_is_listed_and_present(name: str) -> None:
    lib = paths.native_lib_dir() / name
    assert lib.is_file(), f"{lib}: run scripts/setup.sh"
    calls = exported(lib) - {"_init", "_fini"}
    assert calls
    rows = doc_rows()
    missing = sorted(calls - set(rows))
    assert not missing, f"{name} exports calls docs/compatibility.md does not list: {missing}"
    wrong = sorted(c for c in calls if rows[c][1] == "absent" or name not in rows[c][0])
    assert not wrong, f"listed as absent or under another library, but {name} exports them: {wrong}"


def test_no_call_listed_as_present_is_missing_from_its_library() -> None:
    """The other direction: a row that says the emulator has a call names an exported symbol."""
    exports = {n: exported(paths.native_lib_dir() / n) for n in LIBRARIES}
    for call, (section, status) in doc_rows().items():
        lib = next((n for n in LIBRARIES if n in section), None)
        if status != "absent" and lib in exports:
            assert call in exports[lib], f"{call}: listed as {status} in {lib}, which does not export it"


def forwarded_column() -> dict[str, str]:
    """call -> its "forwarded" entry on the page."""
    out: dict[str, str] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 6 and cells[0].startswith("`"):
            out[cells[0].strip("`")] = cells[3]
    return out


def test_the_forwarded_column_is_what_the_forward_library_exports() -> None:
    """Every call the page lists as carried (or remembered) is exported by the built
    libflexnpu_fwd.so, and every AscendCL or aclnn call it exports is listed so."""
    lib = paths.forward_shim_library()
    assert lib.is_file(), f"{lib}: run scripts/setup.sh"
    exports = {n for n in exported(lib) if n.startswith("acl")}
    col = forwarded_column()
    assert col and set(col.values()) <= {"carried", "local, remembered", "local", "not carried", "—"}, set(col.values())
    listed = {n for n, v in col.items() if v in ("carried", "local, remembered")}
    assert sorted(listed - exports) == [], "listed as carried but not exported by libflexnpu_fwd.so"
    assert sorted(exports - listed) == [], "exported by libflexnpu_fwd.so but not listed as carried"
    # every operator the emulator has is carried
    rows = doc_rows()
    ops = [n for n, (section, status) in rows.items() if "libopapi.so" in section and status != "absent"]
    assert ops and all(col[n] == "carried" for n in ops), {n: col[n] for n in ops}
