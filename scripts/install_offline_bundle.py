#!/usr/bin/env python3
"""The Python half of scripts/install_offline_bundle.sh, and the smoke check of an installed bundle.

    python3 scripts/install_offline_bundle.py check BUNDLE              # sha256s, python version, what is present
    python3 scripts/install_offline_bundle.py wheels-installed BUNDLE   # exit 0 if every wheel is installed as is
    python3 scripts/install_offline_bundle.py unpack BUNDLE ASSETS_DIR  # the asset parts present (idempotent)
    python3 scripts/install_offline_bundle.py configure DEST [--target] # DEST/libero-config/config.yaml, DEST/env.sh
    python3 scripts/install_offline_bundle.py smoke [--suites ...] [--all-scenes] [--save-images DIR]

`smoke` makes one LiberoEnv of each suite (the first task whose assets are installed), resets it to
episode 0, takes one step and checks that both camera images are not blank; --all-scenes also compiles
every installed scene (no rendering), which fails on any file the trimmed assets lack; --save-images
writes each suite's two camera images side by side (smoke_<suite>.png). It reads the
variables env.sh sets (VLA_ACCEL_LIBERO_ASSETS, MUJOCO_GL). Everything but `smoke` uses the standard
library only: it runs before anything is installed.
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PARTS_DIR = ".parts"  # in the asset folder: one <part>.json per unpacked part (sha256, scenes)
NVIDIA_EGL_VENDOR = Path("/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json")


def fail(message: str) -> "None":
    raise SystemExit(f"install_offline_bundle: {message}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(bundle: Path) -> dict:
    try:
        return json.loads((bundle / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        fail(f"cannot read {bundle / 'manifest.json'}: {err}")


# ---- check ------------------------------------------------------------------------------------------------------


def cmd_check(args) -> int:
    manifest = load_manifest(args.bundle)
    want = manifest["target"]["python_version"]
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    if want != have:
        fail(f"the bundle was built for Python {want}, this Python ({sys.executable}) is {have}: "
             f"build one with scripts/build_offline_bundle.py --python-version {have}")
    bad, absent_core = [], []
    for group in ("wheels", "gl_debs", "asset_parts"):
        for entry in manifest[group]:
            path = args.bundle / entry["file"]
            if not path.is_file():
                if group != "asset_parts":  # parts may travel separately; the core may not
                    absent_core.append(entry["file"])
            elif path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
                bad.append(entry["file"])
    if bad:
        fail(f"files differ from manifest.json (a broken copy?): {', '.join(bad)}")
    if absent_core:
        fail(f"the bundle's core is incomplete, missing: {', '.join(absent_core)}")
    present = [p for p in manifest["asset_parts"] if (args.bundle / p["file"]).is_file()]
    absent = [p["file"] for p in manifest["asset_parts"] if p not in present]
    print(f"[install] bundle of {manifest['created']} for Python {want}: {len(manifest['wheels'])} wheels, "
          f"{len(manifest['gl_debs'])} GL debs, asset parts present: {', '.join(p['file'] for p in present) or 'none'}")
    if absent:
        print(f"[install] asset parts not here (their scenes will be unavailable): {', '.join(absent)}")
    return 0


# ---- wheels -------------------------------------------------------------------------------------------------------


def cmd_wheels_installed(args) -> int:
    """0 if every wheel of the bundle is installed (where this Python looks) at the bundle's version."""
    for entry in load_manifest(args.bundle)["wheels"]:
        try:
            if importlib.metadata.version(entry["name"]) != entry["version"]:
                return 1
        except importlib.metadata.PackageNotFoundError:
            return 1
    return 0


# ---- assets -------------------------------------------------------------------------------------------------------


def _open_part(path: Path):
    if path.name.endswith(".tar.xz"):
        return tarfile.open(path, "r:xz"), None
    if path.name.endswith(".tar.zst"):
        if shutil.which("zstd") is None:
            fail(f"{path.name} is zstd-compressed and this machine has no zstd program: build with --compression xz")
        proc = subprocess.Popen(["zstd", "-dc", str(path)], stdout=subprocess.PIPE)
        return tarfile.open(fileobj=proc.stdout, mode="r|"), proc
    fail(f"{path.name}: unknown archive type (expected .tar.xz or .tar.zst)")


def cmd_unpack(args) -> int:
    manifest = load_manifest(args.bundle)
    parts_dir = args.assets / PARTS_DIR
    parts_dir.mkdir(parents=True, exist_ok=True)
    for entry in manifest["asset_parts"]:
        path = args.bundle / entry["file"]
        stamp = parts_dir / (Path(entry["file"]).name + ".json")
        if not path.is_file():
            continue
        if stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == entry["sha256"]:
            print(f"[install]   {path.name}: already unpacked")
            continue
        start = time.perf_counter()
        tar, proc = _open_part(path)
        with tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(args.assets, filter="data")
            else:  # Python < 3.11.4: our own archives, written by build_offline_bundle.py
                tar.extractall(args.assets)
        if proc is not None and proc.wait() != 0:
            fail(f"zstd failed on {path}")
        stamp.write_text(json.dumps({"sha256": entry["sha256"], "scenes": entry["scenes"]}) + "\n")
        print(f"[install]   {path.name}: {entry['files']} files in {time.perf_counter() - start:.1f} s")
    return 0


def installed_scenes(assets: Path) -> list[str]:
    scenes = set()
    for stamp in sorted((assets / PARTS_DIR).glob("*.json")):
        scenes.update(json.loads(stamp.read_text())["scenes"])
    return sorted(scenes, key=lambda key: (key.split("/")[0], int(key.split("/")[1])))


# ---- configure ----------------------------------------------------------------------------------------------------


def cmd_configure(args) -> int:
    """LIBERO's config.yaml (so importing hf-libero never prompts) and env.sh with the variables to use."""
    import importlib.util

    dest = args.dest.resolve()
    assets = dest / "libero-assets"
    spec = importlib.util.find_spec("libero")  # the namespace package; libero.libero would run the prompt
    if spec is None or not spec.submodule_search_locations:
        fail("hf-libero is not importable by this Python after installing the wheels")
    root = Path(list(spec.submodule_search_locations)[0]) / "libero"
    config = {
        "benchmark_root": root,
        "bddl_files": root / "bddl_files",
        "init_states": root / "init_files",
        "datasets": root.parent / "datasets",
        "assets": assets,
    }
    config_dir = dest / "libero-config"
    config_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{key}: {json.dumps(str(value))}\n" for key, value in config.items())
    (config_dir / "config.yaml").write_text(text)
    lines = [
        f"export VLA_ACCEL_LIBERO_ASSETS={assets}",
        f"export LIBERO_CONFIG_PATH={config_dir}",
        "export MUJOCO_GL=egl",
        "export PYOPENGL_PLATFORM=egl",
    ]
    if args.target:
        lines.append(f'export PYTHONPATH={dest / "site"}${{PYTHONPATH:+:$PYTHONPATH}}')
        lines.append(f'export PATH={dest / "site" / "bin"}:$PATH')  # vla-accel-eval and the other scripts
    if NVIDIA_EGL_VENDOR.is_file():  # the NVIDIA driver's EGL, outside glvnd's default search path
        lines.append(f"export __EGL_VENDOR_LIBRARY_FILENAMES={NVIDIA_EGL_VENDOR}")
    (dest / "env.sh").write_text("# written by scripts/install_offline_bundle.sh\n" + "\n".join(lines) + "\n")
    return 0


# ---- smoke check --------------------------------------------------------------------------------------------------


def _gl_renderer() -> str:
    try:
        from OpenGL import GL

        return " / ".join(GL.glGetString(name).decode() for name in (GL.GL_VENDOR, GL.GL_RENDERER))
    except Exception as err:  # no current context on this thread, or PyOpenGL missing
        return f"unknown ({type(err).__name__})"


def _image_stats(name: str, image, size: int) -> str:
    import numpy as np

    if image.dtype != np.uint8 or image.shape != (size, size, 3):
        raise AssertionError(f"{name}: expected uint8 [{size}, {size}, 3], got {image.dtype} {list(image.shape)}")
    distinct = len(np.unique(image.reshape(-1, 3), axis=0))
    if image.std() < 2.0 or distinct < 16:
        raise AssertionError(f"{name} is blank: std {image.std():.2f}, {distinct} distinct colours")
    return f"{name} mean {image.mean():.0f} std {image.std():.0f} colours {distinct}"


def cmd_smoke(args) -> int:
    import numpy as np

    assets = os.environ.get("VLA_ACCEL_LIBERO_ASSETS")
    if not assets:
        fail("VLA_ACCEL_LIBERO_ASSETS is not set: source the env.sh that install_offline_bundle.sh wrote")
    scenes = installed_scenes(Path(assets))
    if not scenes:
        fail(f"no asset parts are installed in {assets}")
    first = {}
    for key in scenes:
        first.setdefault(key.split("/")[0], int(key.split("/")[1]))
    from vla_accel.envs import SUITES, LiberoEnv

    suites = args.suites or sorted(first, key=list(SUITES).index)
    absent = [suite for suite in suites if suite not in first]
    if absent:
        fail(f"no installed assets for {', '.join(absent)}; installed: {', '.join(first)}")

    print(f"[smoke] MUJOCO_GL={os.environ.get('MUJOCO_GL')} assets {assets}; {', '.join(suites)}", flush=True)
    for suite in suites:
        start = time.perf_counter()
        env = LiberoEnv(suite, task_id=first[suite], image_size=args.image_size)
        try:
            obs, info = env.reset(options={"episode": 0})
            built = time.perf_counter()
            obs, _, _, _, _ = env.step(np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float32))
            stepped = time.perf_counter()
            renderer = _gl_renderer()
            stats = [_image_stats(name, obs[name], args.image_size) for name in ("full_image", "wrist_image")]
        finally:
            env.close()
        if args.save_images:
            from PIL import Image

            args.save_images.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate([obs["full_image"], obs["wrist_image"]], axis=1)).save(
                args.save_images / f"smoke_{suite}.png"
            )
        print(f"[smoke] {suite} task {first[suite]}: build+reset {built - start:.1f} s, step {stepped - built:.2f} s; "
              f"{'; '.join(stats)}; GL {renderer}", flush=True)
    if args.all_scenes:
        from vla_accel.envs.assets import compiled_scene_files, suite_scenes

        start = time.perf_counter()
        for key in scenes:
            suite, task_id = key.split("/")
            if suite in suites:
                compiled_scene_files(suite_scenes([suite], [int(task_id)])[key], assets)
        print(f"[smoke] compiled all {len(scenes)} installed scenes in {time.perf_counter() - start:.0f} s", flush=True)
    print("[smoke] ok", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="sha256s and python version against manifest.json")
    p.add_argument("bundle", type=Path)
    p = sub.add_parser("wheels-installed", help="exit 0 if every wheel is installed at its version")
    p.add_argument("bundle", type=Path)
    p = sub.add_parser("unpack", help="unpack the asset parts present")
    p.add_argument("bundle", type=Path)
    p.add_argument("assets", type=Path)
    p = sub.add_parser("configure", help="write DEST/libero-config/config.yaml and DEST/env.sh")
    p.add_argument("dest", type=Path)
    p.add_argument("--target", action="store_true", help="the wheels went into DEST/site: add it to PYTHONPATH")
    p = sub.add_parser("smoke", help="one env per installed suite: reset, one step, images not blank")
    p.add_argument("--suites", nargs="+", help="default: every suite with installed assets")
    p.add_argument("--image-size", type=int, default=256, help="camera size in pixels (default: 256, the protocol's)")
    p.add_argument("--all-scenes", action="store_true", help="also compile every installed scene (about 1 s each)")
    p.add_argument("--save-images", type=Path, help="write smoke_<suite>.png (both cameras) into this folder")
    args = parser.parse_args(argv)
    commands = {"check": cmd_check, "wheels-installed": cmd_wheels_installed, "unpack": cmd_unpack,
                "configure": cmd_configure, "smoke": cmd_smoke}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
