"""A wheel built from the repository works on its own: grammar and passes ship inside it."""
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_ships_grammar_and_passes_and_runs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("peftc-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "peftc/lang/peft.lark" in names
    assert "peftc/methods/lora/rewrite.py" in names
    # a fresh venv that sees this environment's dependencies (torch, lark...) through a plain path
    # entry, but not its editable install of peftc, which is only activated from a site directory
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    venv_site = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    str(wheel)], check=True)
    code = ("import peftc, peftc.compiler.passmanager as pm; "
            "print(peftc.__file__); print(sorted(pm.load_passes())); "
            "print(peftc.parse('lora q,v r=4').format())")
    run = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(str(venv_site))
    assert "'lora'" in lines[1]
    assert lines[2].startswith("lora q, v r=4")
