"""scripts/build_offline_bundle.py and scripts/install_offline_bundle.py on small made-up bundles.

    pytest tests/test_offline_bundle.py     # seconds; no network, no wheels downloaded, no simulator

The real bundle is built and installed by hand (docs/evaluation.md, "Offline GPU node"); here the
pieces that decide what ships and what the node trusts: the repacked robosuite wheel installs with pip
and holds only the kept assets, parts are planned into transfers within the budget, the installer
refuses a corrupted file or another Python, unpacks a part once, and writes LIBERO's config.
"""

import base64
import csv
import hashlib
import importlib.util
import io
import json
import lzma
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "scripts" / "install_offline_bundle.py"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_offline_bundle", REPO / "scripts" / "build_offline_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


def _install(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INSTALL), *map(str, args)], capture_output=True, text=True, timeout=120,
                          **kwargs)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the trimmed robosuite wheel ------------------------------------------------------------------------------


def _fake_robosuite_wheel(folder: Path) -> Path:
    files = {
        "robosuite/__init__.py": b"__version__ = '1.4.0'\n",
        "robosuite/models/assets/robots/panda/robot.xml": b"<mujoco/>",
        "robosuite/models/assets/robots/panda/meshes/link0.stl": b"solid panda",
        "robosuite/models/assets/robots/sawyer/robot.xml": b"<mujoco/>",
        "robosuite/models/assets/robots/sawyer/meshes/base.stl": b"solid sawyer" * 100,
        "robosuite-1.4.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: robosuite\nVersion: 1.4.0\n",
        "robosuite-1.4.0.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        "robosuite-1.4.0.dist-info/top_level.txt": b"robosuite\n",
    }
    path = folder / "robosuite-1.4.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("robosuite-1.4.0.dist-info/RECORD", "")
    return path


def test_trimmed_robosuite_wheel_keeps_only_the_named_assets_and_installs(tmp_path):
    source = _fake_robosuite_wheel(tmp_path)
    keep = {"robots/panda/robot.xml", "robots/panda/meshes/link0.stl"}
    (tmp_path / "out").mkdir()
    trimmed, stats = builder.trim_robosuite_wheel(source, tmp_path / "out", keep)
    assert trimmed.name == "robosuite-1.4.0+libero-py3-none-any.whl"
    assert stats["files_dropped"] == 2

    with zipfile.ZipFile(trimmed) as wheel:
        names = set(wheel.namelist())
        assert "robosuite/models/assets/robots/sawyer/meshes/base.stl" not in names
        assert {f"robosuite/models/assets/{name}" for name in keep} <= names
        assert b"Version: 1.4.0+libero" in wheel.read("robosuite-1.4.0+libero.dist-info/METADATA")
        rows = list(csv.reader(io.StringIO(wheel.read("robosuite-1.4.0+libero.dist-info/RECORD").decode())))
        recorded = {row[0] for row in rows}
        assert recorded == names  # every entry, RECORD itself included, and nothing else
        for name, digest, size in rows:
            if digest:
                data = wheel.read(name)
                expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert (digest, int(size)) == (f"sha256={expected}", len(data)), name

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--disable-pip-version-check",
                    "--target", str(target), str(trimmed)], check=True, capture_output=True, timeout=120)
    assert (target / "robosuite/models/assets/robots/panda/meshes/link0.stl").read_bytes() == b"solid panda"
    assert not (target / "robosuite/models/assets/robots/sawyer").exists()
    assert (target / "robosuite-1.4.0+libero.dist-info").is_dir()


def test_trimming_refuses_assets_the_wheel_lacks(tmp_path):
    source = _fake_robosuite_wheel(tmp_path)
    with pytest.raises(SystemExit, match=r"lacks assets LIBERO needs: \['grippers/panda_gripper.xml'\]"):
        builder.trim_robosuite_wheel(source, tmp_path, {"robots/panda/robot.xml", "grippers/panda_gripper.xml"})


# ---- transfers -------------------------------------------------------------------------------------------------


def test_transfers_stay_within_the_budget_and_carry_every_part_once():
    mib = 2**20
    parts = [{"file": name, "bytes": size * mib} for name, size in
             [("object", 31), ("l10a", 25), ("l10b", 13), ("l10c", 27), ("goal", 7), ("spatial", 6)]]
    core, budget = 22 * mib, 55 * mib
    transfers = builder.plan_transfers(parts, core, budget)
    carried = [name for transfer in transfers for name in transfer]
    assert sorted(carried) == sorted(p["file"] for p in parts)
    sizes = {p["file"]: p["bytes"] for p in parts}
    assert all(core + sum(sizes[name] for name in transfer) <= budget for transfer in transfers)
    assert len(transfers) == 4  # 33 MiB of room each: 31 | 27+6 | 25+7 | 13


# ---- the installer's checks ----------------------------------------------------------------------------------------


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(buffer.getvalue())


@pytest.fixture
def bundle(tmp_path):
    """A bundle with one fake wheel entry (pytest, as installed here) and one asset part."""
    root = tmp_path / "bundle"
    (root / "core" / "wheels").mkdir(parents=True)
    (root / "assets").mkdir()
    wheel = root / "core" / "wheels" / "pytest-x-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    part = root / "assets" / "libero_spatial.tar.xz"
    part.write_bytes(_tar_xz({"scenes/scene.xml": b"<mujoco/>", "textures/wood.png": b"png"}))
    manifest = {
        "created": "2026-01-01T00:00:00+00:00",
        "target": {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}"},
        "wheels": [{"file": "core/wheels/pytest-x-py3-none-any.whl", "name": "pytest", "version": pytest.__version__,
                    "bytes": wheel.stat().st_size, "sha256": _digest(wheel.read_bytes())}],
        "gl_debs": [],
        "asset_parts": [{"file": "assets/libero_spatial.tar.xz", "bytes": part.stat().st_size, "files": 2,
                         "sha256": _digest(part.read_bytes()), "scenes": ["libero_spatial/0", "libero_spatial/1"]}],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_check_accepts_an_intact_bundle_and_names_a_corrupted_file(bundle):
    assert _install("check", bundle).returncode == 0
    (bundle / "assets" / "libero_spatial.tar.xz").write_bytes(b"truncated")
    result = _install("check", bundle)
    assert result.returncode != 0
    assert "differ from manifest.json" in result.stderr and "assets/libero_spatial.tar.xz" in result.stderr


def test_check_refuses_a_bundle_for_another_python(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["target"]["python_version"] = "3.99"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = _install("check", bundle)
    assert result.returncode != 0 and "built for Python 3.99" in result.stderr and "--python-version" in result.stderr


def test_absent_parts_are_reported_but_an_absent_wheel_is_an_error(bundle):
    (bundle / "assets" / "libero_spatial.tar.xz").unlink()
    result = _install("check", bundle)
    assert result.returncode == 0 and "not here" in result.stdout
    (bundle / "core" / "wheels" / "pytest-x-py3-none-any.whl").unlink()
    result = _install("check", bundle)
    assert result.returncode != 0 and "core is incomplete" in result.stderr


def test_wheels_installed_compares_versions(bundle):
    assert _install("wheels-installed", bundle).returncode == 0  # pytest at this version is installed here
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["wheels"][0]["version"] = "0.0.1"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert _install("wheels-installed", bundle).returncode == 1


def test_unpack_once_then_skip(bundle, tmp_path):
    assets = tmp_path / "assets"
    first = _install("unpack", bundle, assets)
    assert first.returncode == 0, first.stderr
    assert (assets / "textures" / "wood.png").read_bytes() == b"png"
    stamp = json.loads((assets / ".parts" / "libero_spatial.tar.xz.json").read_text())
    assert stamp["scenes"] == ["libero_spatial/0", "libero_spatial/1"]
    second = _install("unpack", bundle, assets)
    assert "already unpacked" in second.stdout


@pytest.mark.skipif(importlib.util.find_spec("libero") is None, reason="hf-libero not installed")
def test_configure_writes_libero_config_and_env(tmp_path):
    result = _install("configure", tmp_path, "--target")
    assert result.returncode == 0, result.stderr
    config = (tmp_path / "libero-config" / "config.yaml").read_text()
    for key in ("benchmark_root", "bddl_files", "init_states", "datasets", "assets"):
        assert f"{key}: " in config
    assert f'assets: "{tmp_path / "libero-assets"}"' in config
    env = (tmp_path / "env.sh").read_text()
    for line in (f"export VLA_ACCEL_LIBERO_ASSETS={tmp_path / 'libero-assets'}",
                 f"export LIBERO_CONFIG_PATH={tmp_path / 'libero-config'}",
                 "export MUJOCO_GL=egl", f"export PYTHONPATH={tmp_path / 'site'}"):
        assert line in env
    # hf-libero reads the config with yaml: the quoted paths must come back as they were written.
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(config)["assets"] == str(tmp_path / "libero-assets")
