"""The wheel ships the presets: build it, install it apart from the source tree, list them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_presets_and_lists_them(tmp_path):
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("hf_longctx-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    packages = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_longctx").rglob("__init__.py"))
    script = (
        "import hf_longctx, importlib, pathlib, sys; "
        f"assert pathlib.Path(hf_longctx.__file__).is_relative_to({str(site)!r}), hf_longctx.__file__; "
        f"[importlib.import_module(name) for name in {packages!r}]; "  # every package of the source tree is found
        "print('\\n'.join(hf_longctx.list_presets()))"
    )
    # -I: isolated mode, so neither the source tree nor an editable install is on the path
    listed = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); " + script],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.split()
    shipped = sorted(p.stem for p in (ROOT / "patches").glob("*.yaml"))
    assert len(shipped) >= 8
    assert sorted(listed) == shipped
