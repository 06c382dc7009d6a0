"""The structure of ``src/`` in numbers (``scripts/check_structure.py``): short functions, no
defense names compared outside ``defenses/``, one worst-case module, no import cycles.

The first tests hold the package to zero findings; the others plant a violation of each kind in
a throw-away tree and check that it is found, so that a broken check cannot pass silently."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from _scripts import ROOT, load_script

cs = load_script("check_structure")


@pytest.fixture(scope="module")
def findings():
    return cs.run_checks(ROOT / "src")


@pytest.mark.parametrize("check", cs.CHECKS)
def test_package_has_no_finding(findings, check):
    assert not findings[check], f"{check}:\n" + "\n".join(map(str, findings[check]))


# ------------------------------------------------------------------------------ planted violations
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (path -> source) under ``tmp_path/src`` and return that source root."""
    src = tmp_path / "src"
    for rel, text in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return src


def _function(name: str, body_lines: int, decorators: int = 0) -> str:
    """A function whose ``def`` ... last line spans ``body_lines + 1`` lines."""
    return "".join(
        ["@staticmethod\n" * decorators, f"def {name}():\n", *(f"    x{i} = {i}\n" for i in range(body_lines))]
    )


def test_long_function_is_found(tmp_path):
    src = _tree(tmp_path, {
        "bastion/__init__.py": "",
        "bastion/ok.py": _function("exactly_60", 59, decorators=5),
        "bastion/bad.py": "class C:\n" + textwrap.indent(_function("too_long", 60), "    "),
    })
    found = cs.long_functions(src)
    assert [(Path(f.path).name, f.line) for f in found] == [("bad.py", 2)]
    assert "'too_long' is 61 lines" in found[0].message


def test_nested_long_function_is_found(tmp_path):
    inner = textwrap.indent(_function("inner", 61), "    ")
    src = _tree(tmp_path, {"bastion/__init__.py": "", "bastion/m.py": "def outer():\n" + inner})
    assert {f.message.split("'")[1] for f in cs.long_functions(src)} == {"outer", "inner"}


DEFENSE_NAMES = ["sap", "pcl", "clm", "ulm", "multi-sap"]


@pytest.mark.parametrize("code", [
    'if defense == "sap":\n    pass\n',
    'if "pcl" != spec.defense:\n    pass\n',
    'ok = row["defense"] in ("sap", "multi-sap")\n',
    'ok = job.get("defense") not in {"clm"}\n',
    'ok = defense_name == "none"\n',
    'ok = name in ["ulm", "other"]\n',
    'ok = kind in frozenset({"sap"})\n',
    'SEED001 = ("ulm", "clm")\nok = m.defense in SEED001\n',
    'UNDEFENDED = frozenset({"none"})\nok = t.defense in UNDEFENDED\n',
    'match defense:\n    case "sap":\n        pass\n',
    'ok = 0 < defense.count == "clm"\n',
])
def test_defense_name_comparison_is_found(tmp_path, code):
    src = _tree(tmp_path, {"bastion/__init__.py": "", "bastion/harness/x.py": code})
    found = cs.defense_name_comparisons(src, DEFENSE_NAMES)
    assert len(found) == 1 and found[0].path.endswith("bastion/harness/x.py"), found


@pytest.mark.parametrize("code", [
    'ok = norm == "linf"\n',
    'ok = attack == "sap"\n',  # a defense name, but not compared with a defense
    'ok = defense == "pgd"\n',  # compared with a defense, but not a defense's name
    'INITS = ("default", "ulm")\nok = init in INITS\n',
    'ok = defense is None\n',
])
def test_other_comparisons_are_not_findings(tmp_path, code):
    src = _tree(tmp_path, {"bastion/__init__.py": "", "bastion/eval/x.py": code})
    assert cs.defense_name_comparisons(src, DEFENSE_NAMES) == []


def test_defenses_package_may_compare_its_names(tmp_path):
    src = _tree(tmp_path, {"bastion/__init__.py": "", "bastion/defenses/sap.py": 'ok = defense == "sap"\n'})
    assert cs.defense_name_comparisons(src, DEFENSE_NAMES) == []


def test_worst_case_string_is_found(tmp_path):
    src = _tree(tmp_path, {
        "bastion/__init__.py": "",
        "bastion/results/worst_case.py": 'LABEL = "worst-case"\n',
        "bastion/report/table.py": '''\
            """The worst case per model (prose in a docstring is fine)."""
            # and in a comment: worst case
            def title():
                """Worst-case title."""
                return f"{1} models" + (
                    "\\nthe Worst Case"
                )
            ''',
    })
    found = cs.worst_case_strings(src)
    assert [(f.path.endswith("bastion/report/table.py"), f.line) for f in found] == [(True, 6)]
    assert "'Worst Case'" in found[0].message


def test_import_cycles_are_found(tmp_path):
    src = _tree(tmp_path, {
        "bastion/__init__.py": "",
        # a package and its submodule
        "bastion/a/__init__.py": "from bastion.a import b\nX = 1\n",
        "bastion/a/b.py": "from bastion.a import X\n",
        # hidden inside a function, and through a relative import
        "bastion/m.py": "def f():\n    import bastion.n\n",
        "bastion/n.py": "from . import m\n",
        # no cycle: a chain
        "bastion/p.py": "import bastion.q\n",
        "bastion/q.py": "from bastion.a.b import X\n",
    })
    found = cs.import_cycles(src)
    assert [f.message.split(": ")[1] for f in found] == [
        "bastion.a -> bastion.a.b -> bastion.a",
        "bastion.m -> bastion.n -> bastion.m",
    ]
    assert found[1].path.endswith("bastion/m.py") and found[1].line == 2
    assert any(d.endswith("n.py:1: bastion.n imports bastion.m") for d in found[1].details)


def test_no_cycle_no_finding(tmp_path):
    src = _tree(tmp_path, {
        "bastion/__init__.py": "",
        "bastion/core.py": "import os\n",
        "bastion/top.py": "from bastion import core\ndef f():\n    from bastion.core import os\n",
    })
    assert cs.import_cycles(src) == []


def test_exit_status_and_json(tmp_path, capsys):
    clean = _tree(tmp_path / "clean", {"bastion/__init__.py": "", "bastion/m.py": "X = 1\n"})
    assert cs.main(["--src", str(clean), "--defense-names", "sap"]) == 0
    capsys.readouterr()
    dirty = _tree(tmp_path / "dirty", {"bastion/__init__.py": "", "bastion/m.py": 'ok = defense == "sap"\n'})
    assert cs.main(["--src", str(dirty), "--defense-names", "sap", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert set(report) == set(cs.CHECKS)
    assert [f["line"] for f in report["defense-names"]] == [1]
    assert cs.main(["--src", str(dirty), "--defense-names", "sap"]) == 1
    assert "bastion/m.py:1: compares with defense name(s) 'sap'" in capsys.readouterr().out


def test_architecture_doc_names_only_files_that_exist():
    """docs/architecture.md follows a row one file per step: every source path it names in
    backticks (``harness/eval_job.py``, ``src/bastion/...``) must exist, so the page cannot
    point a newcomer at a file that moved."""
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([\w./]+\.(?:py|toml|md))`", text))
    assert len(named) >= 20, named  # the row's path names its files
    missing = []
    for rel in sorted(named):
        candidates = [ROOT / rel, ROOT / "src" / "bastion" / rel]
        if not any(p.is_file() for p in candidates):
            missing.append(rel)
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
