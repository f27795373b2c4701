"""The committed notebooks carry their outputs (figures visible when browsing the repository), and those
outputs hold no machine-specific path and nothing that looks like a secret. (CI also executes them: nbmake.)

Re-execute them in place after changing one (README, "Notebooks"):
``jupyter execute --inplace --timeout=1800 notebooks/*.ipynb``.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
# Home and work folders, temporary folders, installed-package locations: they differ on every machine.
MACHINE_PATH = re.compile(r"(?<![\w.])(/work/|/root/|/home/\w|/Users/\w|/tmp/|/var/folders/|[A-Z]:\\(?:Users|Windows)\\|"
                          r"site-packages/|dist-packages/)")
SECRET = re.compile(r"(AKIA[0-9A-Z]{16}|ghp_[0-9A-Za-z]{36}|hf_[0-9A-Za-z]{30,}|-----BEGIN [A-Z ]*PRIVATE KEY|"
                    r"(?i:api[_-]?key|secret|password|token)\s*[=:]\s*['\"][^'\"]{8,})")


def output_texts(cell):
    for out in cell.get("outputs", []):
        if "text" in out:
            yield "".join(out["text"])
        for mime, data in out.get("data", {}).items():
            if mime.startswith("text/") or mime.endswith("json"):
                yield data if isinstance(data, str) else "".join(data) if isinstance(data, list) else json.dumps(data)
        if "traceback" in out:
            yield "\n".join(out["traceback"])


@pytest.fixture(params=NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def notebook(request):
    return json.loads(request.param.read_text())


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


def test_committed_with_outputs_and_figures(notebook):
    code = [c for c in notebook["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    unexecuted = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unexecuted, f"code cells {unexecuted} were not executed: run jupyter execute --inplace"
    assert any(c.get("outputs") for c in code), "no outputs: the notebook was committed without running it"
    figures = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert figures, "no figure among the outputs"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors[0].get("ename")


def test_outputs_hold_no_machine_path_or_secret(notebook):
    for i, cell in enumerate(notebook["cells"]):
        for text in output_texts(cell):
            found = MACHINE_PATH.search(text)
            assert not found, f"cell {i}: machine-specific path {text[max(0, found.start() - 60):found.end() + 60]!r}"
            assert not SECRET.search(text), f"cell {i}: something like a secret in the output"
        assert not SECRET.search("".join(cell["source"])), f"cell {i}: something like a secret in the source"
