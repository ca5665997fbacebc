"""Getting hf-libero ready to import: its config file, the asset folder, the lazy imports.

hf-libero reads `$LIBERO_CONFIG_PATH/config.yaml` when `libero.libero` is first imported and, if
the file is missing, asks an interactive question (`input()`), which kills any program without a
terminal. So before the first import we write that file ourselves into a private directory
(`~/.cache/vla_accel/libero`, or `$XDG_CACHE_HOME/vla_accel/libero`; a folder in the temp dir
when that is read-only) and point `LIBERO_CONFIG_PATH` at it. BDDL files and init states always
come from the installed package.

The meshes and textures ("assets") are not part of hf-libero. The folder is, in this order:
  1. the `assets_path` argument,
  2. the environment variable `VLA_ACCEL_LIBERO_ASSETS` (tests and CI: `../shared/libero-assets`),
  3. hf-libero's own default: the package's `assets/` folder, else `~/.cache/libero/assets`,
     which hf-libero downloads from the Hugging Face Hub when it is missing.
hf-libero's scene builder asks `libero.libero.get_assets_path()`, which returns
`libero.libero._assets_path_cache` when set: `configure_libero` sets it in the calling process.

Nothing here imports robosuite or MuJoCo; `import_libero_envs` does, after setting `MUJOCO_GL`.
"""

import contextlib
import importlib.util
import io
import os
import sys
import tempfile
from pathlib import Path

import yaml

ASSETS_ENV_VAR = "VLA_ACCEL_LIBERO_ASSETS"

# Top-level entries of the LIBERO asset tree that the scenes of the five suites load from.
REQUIRED_ASSET_ENTRIES = (
    "articulated_objects",
    "scenes",
    "stable_hope_objects",
    "stable_scanned_objects",
    "textures",
    "turbosquid_objects",
)


class LiberoAssetsError(FileNotFoundError):
    """The LIBERO asset folder is missing or incomplete; the message names the setting to fix."""


def libero_config_dir() -> Path:
    """The private directory that holds LIBERO's config.yaml (LIBERO_CONFIG_PATH)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "vla_accel" / "libero"


def _package_root() -> Path:
    # Locate libero/libero without importing it (importing it is what triggers the prompt).
    spec = importlib.util.find_spec("libero.libero")
    if spec is None or spec.origin is None:
        raise ImportError("hf-libero is not installed: pip install 'vla-accel[libero]' (or hf-libero>=0.1.4)")
    return Path(spec.origin).parent


def _write_if_changed(config_dir: Path, text: str) -> Path:
    config_file = config_dir / "config.yaml"
    if not config_file.exists() or config_file.read_text() != text:
        config_dir.mkdir(parents=True, exist_ok=True)
        # Write then rename: spawned workers may do this at the same time.
        tmp = config_dir / f".config.yaml.{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, config_file)
    return config_file


def _write_config(assets: Path | None) -> Path:
    """Write config.yaml (idempotent, atomic) and set LIBERO_CONFIG_PATH; returns the file."""
    root = _package_root()
    config = {
        "benchmark_root": str(root),
        "bddl_files": str(root / "bddl_files"),
        "init_states": str(root / "init_files"),
        "datasets": str(root.parent / "datasets"),
        "assets": str(assets if assets is not None else root / "assets"),
    }
    text = yaml.safe_dump(config)
    try:
        config_file = _write_if_changed(libero_config_dir(), text)
    except OSError:  # read-only home (some CI runners): a private folder in the temp dir instead
        config_file = _write_if_changed(Path(tempfile.gettempdir()) / f"vla_accel-libero-{os.getuid()}", text)
    config_dir = config_file.parent
    os.environ["LIBERO_CONFIG_PATH"] = str(config_dir)
    libero_mod = sys.modules.get("libero.libero")
    if libero_mod is not None:
        # Imported before us with another config: hf-libero reads this module global on every
        # path lookup, so repointing it is enough.
        libero_mod.config_file = str(config_file)
    return config_file


def _missing_entries(folder: Path) -> list[str]:
    return [name for name in REQUIRED_ASSET_ENTRIES if not (folder / name).is_dir()]


def _hf_libero_default_assets() -> Path:
    """hf-libero's own choice: the package's assets/, else ~/.cache/libero/assets (downloaded if missing)."""
    packaged = _package_root() / "assets"
    if packaged.is_dir():
        return packaged
    cache = Path.home() / ".cache" / "libero" / "assets"
    if cache.is_dir() and not _missing_entries(cache):
        return cache
    _write_config(None)
    from libero.libero.utils.download_utils import download_assets_from_huggingface

    try:
        return Path(download_assets_from_huggingface(str(cache)))
    except Exception as err:  # no network, no huggingface_hub, ...
        raise LiberoAssetsError(
            f"No LIBERO asset folder given and hf-libero could not download one to {cache} ({err}). "
            f"Point `assets_path=` or the environment variable {ASSETS_ENV_VAR} at the LIBERO asset folder."
        ) from err


def resolve_assets_path(assets_path: str | os.PathLike | None = None) -> Path:
    """The asset folder to use (argument > $VLA_ACCEL_LIBERO_ASSETS > hf-libero default), checked."""
    if assets_path is not None:
        folder, source = Path(assets_path), "the `assets_path` argument"
    elif os.environ.get(ASSETS_ENV_VAR):
        folder, source = Path(os.environ[ASSETS_ENV_VAR]), f"the environment variable {ASSETS_ENV_VAR}"
    else:
        folder, source = _hf_libero_default_assets(), "hf-libero's default location"
    how_to_fix = (
        f"Point `assets_path=` or the environment variable {ASSETS_ENV_VAR} at the LIBERO asset folder "
        f"(the one holding {', '.join(REQUIRED_ASSET_ENTRIES)})."
    )
    folder = folder.expanduser().resolve()
    if not folder.is_dir():
        raise LiberoAssetsError(f"LIBERO asset folder {folder} (from {source}) does not exist. {how_to_fix}")
    missing = _missing_entries(folder)
    if missing:
        raise LiberoAssetsError(
            f"LIBERO asset folder {folder} (from {source}) lacks {', '.join(missing)}. {how_to_fix}"
        )
    return folder


def configure_libero(assets_path: str | os.PathLike | None = None) -> Path:
    """Make hf-libero importable without a prompt and point it at the asset folder.

    Writes config.yaml into `libero_config_dir()`, sets LIBERO_CONFIG_PATH and
    `libero.libero._assets_path_cache`. Idempotent; returns the resolved asset folder.
    """
    assets = resolve_assets_path(assets_path)
    _write_config(assets)
    import libero.libero

    libero.libero._assets_path_cache = str(assets)
    return assets


def import_benchmark():
    """`libero.libero.benchmark`, imported without the config prompt (assets not needed)."""
    if "libero.libero" not in sys.modules:
        _write_config(None)
    from libero.libero import benchmark

    return benchmark


def make_benchmark(suite: str):
    """hf-libero's benchmark object of a suite, in the default task order (as the OFT eval)."""
    benchmark = import_benchmark()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "[info] using task orders ..."
        return benchmark.get_benchmark_dict()[suite]()


def import_libero_envs():
    """`libero.libero.envs` (robosuite + MuJoCo), rendering headless through EGL unless told otherwise."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    if "libero.libero" not in sys.modules:
        _write_config(None)
    from libero.libero import envs

    return envs
