"""`routedsl check` from an installed wheel, not from the checkout: the grammar ships in the package."""
import importlib.util
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_installed_wheel_checks_the_example_from_elsewhere(tmp_path):
    dist = tmp_path / "dist"
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(ROOT)]
    if importlib.util.find_spec("hatchling") is not None:     # else pip fetches the build backend
        args += ["--no-build-isolation", "--no-index"]
    build = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("routedsl-*.whl")
    assert "routedsl/routes.lark" in zipfile.ZipFile(wheel).namelist()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=60)
    py = venv / "bin" / "python"
    # The dependencies (lark) come from the environment running the tests; its .pth files
    # (the editable install of the checkout) are not read from a path added this way.
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                              str(wheel)], capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "routes.rules").write_bytes((ROOT / "routes.rules").read_bytes())
    where = subprocess.run([str(py), "-c", "import routedsl; print(routedsl.__file__)"], cwd=work,
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    check = subprocess.run([str(venv / "bin" / "routedsl"), "check", "routes.rules"], cwd=work,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout == "routes.rules: OK (4 engines, 8 rules, 9 expectations)\n"
