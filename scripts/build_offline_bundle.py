#!/usr/bin/env python3
"""Build the offline bundle for a GPU node without network: wheels, GL loader debs, trimmed LIBERO assets.

    python scripts/build_offline_bundle.py                         # .bundle/: Python 3.12 (our GPU machine), 4 suites
    python scripts/build_offline_bundle.py --python-version 3.11 --out /tmp/bundle311
    python scripts/build_offline_bundle.py --suites libero_spatial libero_goal --budget-mib 55

Runs where pip reaches PyPI and apt-get Debian's archive, with vla_accel[libero] installed (the file
selection asks hf-libero and robosuite which files the scenes load) and LIBERO's assets at --assets
(default $VLA_ACCEL_LIBERO_ASSETS). Writes into --out (default .bundle/, git-ignored):

    manifest.json          every file with size and sha256, versions, python tag, suites, parts, date
    core/wheels/*.whl      what the node's Python lacks (RESOLVED, NO_DEPS, RUNTIME_EXTRAS below);
                           robosuite trimmed to the
                           assets LIBERO's Panda needs (version 1.4.0+libero)
    core/gl/*.deb          the GL loader libraries through glvnd (libEGL, libOpenGL, ...), to unpack into /
    assets/<part>.tar.xz   the LIBERO asset files the scenes of a part reference: one part per suite,
                           split by tasks while core + part exceeds --budget-mib (one transfer)

Then it checks what it built: each part is unpacked on its own and every scene of it is built (no
rendering) with the trimmed robosuite, so a file that the trimming lost fails the build.
xz, not zstd: on the 75 MB of libero_10 xz -9 gave 42.3 MiB and zstd -19 44.5 MiB (-22 --long 43.8) in
similar times, most of it PNG textures that no compressor shrinks, and every Python unpacks xz.

Install on the node with scripts/install_offline_bundle.sh (docs/evaluation.md, "Offline GPU node").
"""

import argparse
import base64
import csv
import hashlib
import io
import json
import lzma
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    sys.exit("build_offline_bundle.py needs Python 3.11 or newer (tomllib, hashlib.file_digest)")

REPO = Path(__file__).resolve().parent.parent
NODE_PACKAGES = Path(__file__).resolve().with_name("build_offline_bundle.node-packages.txt")
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
GL_DEBS = ("libegl1", "libglvnd0", "libopengl0", "libgl1", "libglx0", "libgles2")  # the device README's, less Vulkan

# What the bundle ships, beyond what the node has (NODE_PACKAGES). Specifiers come from pyproject.toml.
# Resolved: downloaded with their dependencies, then the node's packages are dropped.
# The simulator stack, then vla_accel's own needs the GPU image lacks (simplejpeg: the pre-processing's JPEG decode;
# the serve extra: vla-accel-serve and policy=remote). Missing simplejpeg stopped the first GPU run (2026-11-30).
RESOLVED = ("mujoco", "gymnasium", "hydra-core", "omegaconf",
            "simplejpeg", "uvicorn", "starlette", "websockets", "json-numpy")
# Without dependencies: what they declare pulls in far more than LIBERO evaluation imports.
NO_DEPS = {
    "hf-libero": "declares robomimic, wandb, thop, einops, hf-egl-probe and more that building and stepping "
    "LIBERO envs never imports (checked in a clean venv); what it does import is on the node or below",
    "robosuite": "declares mujoco (resolved above), numba, scipy, opencv-python, Pillow: the node has the "
    "others (opencv as opencv-python-headless, which provides the same cv2)",
    "bddl": "declares jupytext and pytest, which parsing BDDL files does not import",
}
# Imported at run time by the NO_DEPS packages, on neither the node nor RESOLVED's list; found by building
# and stepping an env of each suite in a venv holding only the node's packages and the bundle.
RUNTIME_EXTRAS = {
    "termcolor": "robosuite.utils.log_utils imports it (robosuite 1.4.0 does not declare it)",
    "future": "bddl imports future.utils",
    "easydict": "hf-libero's articulated objects import it",
}
# Pure-Python packages PyPI has only as source: built into py3-none-any wheels here.
FROM_SOURCE = {
    "bddl": None,  # specifier from pyproject.toml
    "antlr4-python3-runtime": "==4.9.3",  # hydra-core 1.3 and omegaconf 2.3 require 4.9.*
}
ROBOSUITE_LOCAL_VERSION = "libero"  # the trimmed wheel is robosuite 1.4.0+libero


def log(message: str) -> None:
    print(f"[bundle] {message}", flush=True)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"[bundle] failed ({result.returncode}): {' '.join(cmd)}\n"
                         f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


# ---- wheels ---------------------------------------------------------------------------------------------------


def pyproject_specifiers() -> dict[str, str]:
    """{canonical name: requirement string} from pyproject.toml's dependencies and its `libero` and `serve` extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + extras["libero"] + extras["serve"]
    return {canonical(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]): req for req in requirements}


def read_node_packages(path: Path) -> set[str]:
    lines = path.read_text().splitlines()
    names = {canonical(line.strip()) for line in lines if line.strip() and not line.startswith("#")}
    if not names:
        raise SystemExit(f"[bundle] {path} lists no packages (one name a line expected)")
    return names


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def target_args(python_version: str, platforms: list[str]) -> list[str]:
    major_minor = python_version.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    args += ["--abi", f"cp{major_minor}", "--abi", "abi3", "--abi", "none"]
    for plat in platforms:
        args += ["--platform", plat]
    return args


def download_wheels(work: Path, python_version: str, platforms: list[str], node: set[str]) -> list[dict]:
    """Download (and build, for source-only pure-Python packages) the wheels; returns one record each."""
    pins = pyproject_specifiers()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built, resolved, nodeps = work / "built", work / "resolved", work / "nodeps"
    for folder in (built, resolved, nodeps):
        folder.mkdir(parents=True)

    for name, spec in FROM_SOURCE.items():
        requirement = pins.get(name, name) if spec is None else f"{name}{spec}"
        log(f"building a pure-Python wheel of {requirement} from its source")
        run(pip + ["wheel", "-q", "--no-deps", "--no-binary", name, "-w", str(built), requirement])
    for wheel in built.glob("*.whl"):
        if not wheel.name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"[bundle] {wheel.name} is not a pure-Python wheel: it cannot serve another Python")

    args = target_args(python_version, platforms) + ["--find-links", str(built)]
    resolved_reqs = [pins.get(name, name) for name in RESOLVED]
    log(f"downloading {', '.join(resolved_reqs)} with their dependencies for Python {python_version}")
    run(pip + ["download", "-q", "-d", str(resolved)] + args + resolved_reqs)
    nodeps_reqs = [pins.get(name, name) for name in NO_DEPS] + [pins.get(n, n) for n in RUNTIME_EXTRAS]
    log(f"downloading {', '.join(nodeps_reqs)} without dependencies")
    run(pip + ["download", "-q", "--no-deps", "-d", str(nodeps)] + args + nodeps_reqs)

    check_versions(nodeps)
    records, seen = [], set()
    for folder, how in ((nodeps, "no-deps"), (resolved, "resolved")):
        for wheel in sorted(folder.glob("*.whl")):
            name, version = wheel_name_version(wheel)
            if name in seen:
                continue
            seen.add(name)
            if name in node:
                log(f"  {wheel.name}: the node has {name}, left out")
                continue
            note = NO_DEPS.get(name) or RUNTIME_EXTRAS.get(name) or ""
            records.append({"path": wheel, "name": name, "version": version, "how": how, "note": note})
    return records


def check_versions(folder: Path) -> None:
    """The file selection asked the hf-libero and robosuite installed here: the bundle must ship the same."""
    import importlib.metadata

    for wheel in folder.glob("*.whl"):
        name, version = wheel_name_version(wheel)
        if name in ("hf-libero", "robosuite"):
            here = importlib.metadata.version(name)
            if here.split("+")[0] != version:
                raise SystemExit(f"[bundle] the bundle ships {name} {version} but the file selection used "
                                 f"{name} {here} "
                                 f"installed here: pip install '{name}=={version}' first")


def trim_robosuite_wheel(src: Path, dest_dir: Path, keep_assets: set[str]) -> tuple[Path, dict]:
    """Repack robosuite's wheel with only `keep_assets` under robosuite/models/assets; version 1.4.0+libero.

    The code, the controller configs and the metadata stay; RECORD is rewritten for what remains.
    """
    name, version = src.name.split("-")[:2]
    new_version = f"{version}+{ROBOSUITE_LOCAL_VERSION}"
    old_info, new_info = f"{name}-{version}.dist-info/", f"{name}-{new_version}.dist-info/"
    prefix = "robosuite/models/assets/"
    dest = dest_dir / src.name.replace(f"-{version}-", f"-{new_version}-")
    kept_bytes = dropped_bytes = dropped = 0
    records = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        missing = sorted(keep_assets - {n[len(prefix):] for n in zin.namelist() if n.startswith(prefix)})
        if missing:
            raise SystemExit(f"[bundle] {src.name} lacks assets LIBERO needs: {missing}")
        for info in zin.infolist():
            entry = info.filename
            if entry.startswith(prefix) and entry[len(prefix):] not in keep_assets and not entry.endswith("/"):
                dropped, dropped_bytes = dropped + 1, dropped_bytes + info.file_size
                continue
            if entry == f"{old_info}RECORD":
                continue
            data = zin.read(entry)
            if entry.startswith(old_info):
                entry = new_info + entry[len(old_info):]
                if entry.endswith("/METADATA"):
                    data = re.sub(rb"(?m)^Version: .*$", f"Version: {new_version}".encode(), data, count=1)
            kept_bytes += len(data)
            entry_info = zipfile.ZipInfo(entry, date_time=info.date_time)
            entry_info.external_attr = info.external_attr  # file modes
            zout.writestr(entry_info, data, zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append((entry, f"sha256={digest}", str(len(data))))
        record = io.StringIO()
        csv.writer(record, lineterminator="\n").writerows(records + [(f"{new_info}RECORD", "", "")])
        zout.writestr(f"{new_info}RECORD", record.getvalue(), zipfile.ZIP_DEFLATED)
    stats = {"assets_kept": len(keep_assets), "files_dropped": dropped, "bytes_dropped": dropped_bytes,
             "bytes_kept": kept_bytes, "from": src.name}
    return dest, stats


# ---- GL loader debs ------------------------------------------------------------------------------------------------


def download_gl_debs(dest: Path, packages) -> list[dict]:
    """The device README's recipe: amd64 debs of the glvnd GL loaders, downloaded with a private apt list."""
    if shutil.which("apt-get") is None:
        raise SystemExit("[bundle] apt-get not found: the GL loader debs come from Debian's archive (or pass --no-gl)")
    state = Path(tempfile.mkdtemp(prefix="bundle-apt-"))
    (state / "lists" / "partial").mkdir(parents=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True)
    options = ["-oAPT::Architecture=amd64", "-oAPT::Architectures=amd64", f"-oDir::State::Lists={state / 'lists'}",
               f"-oDir::Cache={state / 'cache'}", "-oDebug::NoLocking=1"]
    log(f"apt-get update (private lists in {state}) and download {' '.join(packages)}")
    run(["apt-get", *options, "update", "-qq"])
    dest.mkdir(parents=True, exist_ok=True)
    run(["apt-get", *options, "download", "-qq", *packages], cwd=dest)
    shutil.rmtree(state, ignore_errors=True)
    records = []
    for deb in sorted(dest.glob("*.deb")):
        fields = run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture"]).stdout
        info = dict(line.split(": ", 1) for line in fields.strip().splitlines())
        records.append({"path": deb, "name": info["Package"], "version": info["Version"], "arch": info["Architecture"]})
    return records


# ---- asset parts ---------------------------------------------------------------------------------------------------


def _tar_bytes(root: Path, files: list[str], extra_dirs) -> bytes:
    """A deterministic tar (sorted, fixed owner and times) of root/files, with the folders `extra_dirs`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        names = set(files)
        for name in files:  # every parent folder, so an empty top-level entry still exists
            names.update(str(parent) for parent in Path(name).parents if str(parent) != ".")
        names.update(extra_dirs)
        for name in sorted(names):
            path = root / name
            info = tar.gettarinfo(str(path), arcname=name) if path.exists() else tarfile.TarInfo(name)
            if not path.exists():
                info.type = tarfile.DIRTYPE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o755 if info.isdir() else 0o644
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buffer.getvalue()


def compressed_lower_bound(selection, files) -> int:
    """Bytes that xz surely cannot go below: 85% of the images (PNG/JPEG barely shrink) and 10% of the rest.
    On libero_10: images 40.3 MiB -> 36.3, the rest 30.6 MiB -> 6; so a part above this is not tried."""
    images = sum((selection.root / f).stat().st_size for f in files if f.lower().endswith((".png", ".jpg", ".jpeg")))
    return int(0.85 * images + 0.1 * (selection.size_bytes(files) - images))


def pack_part(out: Path, name: str, selection, scenes: list[str], extra_dirs, notes) -> dict:
    files = sorted(set(selection.files_of(scenes) + [n for n in notes if (selection.root / n).is_file()]))
    start = time.perf_counter()
    raw = _tar_bytes(selection.root, files, extra_dirs)
    path = out / f"{name}.tar.xz"
    path.write_bytes(lzma.compress(raw, preset=9))  # lzma releases the GIL: parts compress in parallel
    seconds = time.perf_counter() - start
    log(f"  {path.name}: {len(scenes)} scenes, {len(files)} files, {len(raw) / 2**20:.1f} MiB -> "
        f"{path.stat().st_size / 2**20:.1f} MiB in {seconds:.0f} s")
    return {"path": path, "scenes": scenes, "files": len(files), "raw_bytes": len(raw), "seconds": round(seconds, 1)}


def pack_assets(out: Path, selection, suites, room: int, extra_dirs, notes) -> list[dict]:
    """One part per suite; a part above `room` bytes (what one transfer leaves beside the core) is split by
    tasks, in halves, until each fits. Parts compress in parallel."""
    out.mkdir(parents=True, exist_ok=True)

    def name_of(scenes):
        suite, tasks = scenes[0].split("/")[0], [int(key.split("/")[1]) for key in scenes]
        whole = len(scenes) == sum(key.split("/")[0] == suite for key in selection.scenes)
        return suite if whole else f"{suite}-tasks{min(tasks)}-{max(tasks)}"

    def halves(scenes):
        if len(scenes) == 1:
            raise SystemExit(f"[bundle] {scenes[0]} alone does not fit beside the core in the budget: "
                             "raise --budget-mib or leave its suite out")
        return [scenes[: len(scenes) // 2], scenes[len(scenes) // 2 :]]

    pending = [[key for key in selection.scenes if key.split("/")[0] == suite] for suite in suites]
    parts = []
    while pending:
        ready = []
        while pending:
            scenes = pending.pop(0)
            if compressed_lower_bound(selection, selection.files_of(scenes)) > room:
                log(f"  {name_of(scenes)} cannot fit beside the core: splitting its tasks in two")
                pending[:0] = halves(scenes)
            else:
                ready.append(scenes)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            def pack(scenes):
                return pack_part(out, name_of(scenes), selection, scenes, extra_dirs, notes)

            packed = list(pool.map(pack, ready))
        for scenes, part in zip(ready, packed):
            if part["path"].stat().st_size <= room:
                parts.append(part)
            else:
                log(f"  {part['path'].name} does not fit beside the core: splitting its tasks in two")
                part["path"].unlink()
                pending += halves(scenes)
    order = {suite: i for i, suite in enumerate(suites)}
    return sorted(parts, key=lambda p: (order[p["scenes"][0].split("/")[0]], int(p["scenes"][0].split("/")[1])))


def plan_transfers(parts: list[dict], core_bytes: int, budget: int) -> list[list[str]]:
    """Group parts into transfers of core + parts within the budget (first fit, largest first)."""
    transfers = []  # [names, bytes]
    for part in sorted(parts, key=lambda p: -p["bytes"]):
        for transfer in transfers:
            if transfer[1] + part["bytes"] <= budget:
                transfer[0].append(part["file"])
                transfer[1] += part["bytes"]
                break
        else:
            transfers.append([[part["file"]], core_bytes + part["bytes"]])
    return [sorted(names) for names, _ in transfers]


# ---- verification: build every scene from what the bundle holds ------------------------------------------------


def verify_bundle(parts: list[dict], robosuite_wheel: Path) -> None:
    """Unpack the trimmed robosuite and each part on its own; build every scene of the part (no rendering)
    in a subprocess that imports that robosuite. Fails the build on any scene that does not load."""
    with tempfile.TemporaryDirectory(prefix="bundle-verify-") as tmp:
        site = Path(tmp) / "site"
        with zipfile.ZipFile(robosuite_wheel) as wheel:
            wheel.extractall(site)  # a pure-Python wheel: unzipping is installing
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        problems = []
        for part in parts:
            folder = Path(tmp) / part["path"].name.split(".")[0]
            with tarfile.open(part["path"], "r:xz") as tar:
                tar.extractall(folder, filter="data")
            start = time.perf_counter()
            result = subprocess.run([sys.executable, __file__, "verify-part", str(folder), *part["scenes"]],
                                    env=env, capture_output=True, text=True)
            if result.returncode != 0:
                problems.append(f"{part['path'].name}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
            else:
                log(f"  {part['path'].name}: its {len(part['scenes'])} scenes build "
                    f"({time.perf_counter() - start:.0f} s)")
            shutil.rmtree(folder)
    if problems:
        raise SystemExit("[bundle] verification failed:\n" + "\n".join(problems))


def verify_part_main(folder: str, scene_keys: list[str]) -> int:
    """The subprocess of verify_bundle: build the scenes against one unpacked part."""
    import importlib.metadata

    from vla_accel.envs import assets

    version = importlib.metadata.version("robosuite")
    if not version.endswith(f"+{ROBOSUITE_LOCAL_VERSION}"):
        print(f"robosuite {version} imported, not the trimmed one: PYTHONPATH must put it first")
        return 1
    by_suite = {}
    for key in scene_keys:
        suite, task_id = key.split("/")
        by_suite.setdefault(suite, []).append(int(task_id))
    scenes = {}
    for suite, task_ids in by_suite.items():
        scenes.update(assets.suite_scenes([suite], task_ids))
    problems = assets.check_scenes_compile(scenes, folder)
    print("\n".join(problems))
    return 1 if problems else 0


# ---- main ------------------------------------------------------------------------------------------------------------


def file_record(path: Path, out: Path, **fields) -> dict:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"file": path.relative_to(out).as_posix(), "bytes": path.stat().st_size, "sha256": digest, **fields}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".bundle",
                        help="output folder, replaced (default: .bundle/)")
    parser.add_argument("--python-version", default="3.12", help="the node's Python, major.minor (default: 3.12)")
    parser.add_argument("--platform", nargs="+",
                        default=["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
                        help="wheel platform tags the node accepts (default: manylinux x86_64 up to glibc 2.28)")
    parser.add_argument("--suites", nargs="+", default=list(SUITES),
                        help=f"LIBERO suites (default: {' '.join(SUITES)})")
    parser.add_argument("--assets", type=Path, default=os.environ.get("VLA_ACCEL_LIBERO_ASSETS"),
                        help="the full LIBERO asset folder (default: $VLA_ACCEL_LIBERO_ASSETS)")
    parser.add_argument("--budget-mib", type=float, default=55.0,
                        help="what one transfer may carry, core + asset parts, MiB (default: 55)")
    parser.add_argument("--node-packages", type=Path, default=NODE_PACKAGES,
                        help="names of the Python packages the node already has, one a line "
                             "(default: our GPU machine's)")
    parser.add_argument("--no-gl", action="store_true", help="leave out the GL loader debs")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip building every scene from the packed parts and the trimmed robosuite")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version must be major.minor like 3.12, got {args.python_version!r}")
    if args.assets is None:
        parser.error("no LIBERO asset folder: pass --assets or set VLA_ACCEL_LIBERO_ASSETS")
    if args.budget_mib <= 0:
        parser.error(f"--budget-mib must be > 0, got {args.budget_mib}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from vla_accel.envs import assets
    from vla_accel.envs.libero import SUITES as KNOWN_SUITES
    from vla_accel.envs.libero_setup import REQUIRED_ASSET_ENTRIES, resolve_assets_path

    unknown = [suite for suite in args.suites if suite not in KNOWN_SUITES]
    if unknown:
        raise SystemExit(f"[bundle] unknown suites {unknown}; valid: {', '.join(KNOWN_SUITES)}")
    source = resolve_assets_path(args.assets)
    node = read_node_packages(args.node_packages)

    log(f"selecting the asset files of {', '.join(args.suites)} from {source}")
    selection = assets.select_suites(args.suites, source)
    robosuite_files = set(assets.robosuite_asset_files())
    log(f"  {len(selection.files)} LIBERO files ({selection.size_bytes() / 2**20:.1f} MiB), "
        f"{len(robosuite_files)} robosuite files")

    # Built beside the output and moved in place at the end: a failed build leaves the old bundle intact.
    out = args.out.resolve()
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    wheels_dir, gl_dir = work / "core" / "wheels", work / "core" / "gl"
    wheels_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="bundle-wheels-") as tmp:
        downloaded = download_wheels(Path(tmp), args.python_version, args.platform, node)
        wheels, trim_stats, robosuite_wheel = [], None, None
        for record in downloaded:
            if record["name"] == "robosuite":
                path, trim_stats = trim_robosuite_wheel(record["path"], wheels_dir, robosuite_files)
                record.update(how="no-deps, assets trimmed", version=wheel_name_version(path)[1])
                robosuite_wheel = path
                before, after = record['path'].stat().st_size / 2**20, path.stat().st_size / 2**20
                log(f"  robosuite trimmed: {before:.1f} -> {after:.1f} MiB")
            else:
                path = Path(shutil.copy2(record["path"], wheels_dir))
            wheels.append(file_record(path, work, name=record["name"], version=record["version"], how=record["how"],
                                      note=record["note"]))
    gl = [] if args.no_gl else [file_record(r["path"], work, name=r["name"], version=r["version"], arch=r["arch"])
                                for r in download_gl_debs(gl_dir, GL_DEBS)]
    core_bytes = sum(r["bytes"] for r in wheels + gl)
    budget = int(args.budget_mib * 2**20)
    if core_bytes >= budget:
        raise SystemExit(f"[bundle] the core alone is {core_bytes / 2**20:.1f} MiB, "
                         f"over --budget-mib {args.budget_mib}")
    log(f"core: {len(wheels)} wheels, {len(gl)} debs, {core_bytes / 2**20:.1f} MiB; packing assets (xz -9), "
        f"at most {(budget - core_bytes) / 2**20:.1f} MiB a part")

    notes = [name for name in ("STANDINS.txt",) if (source / name).is_file()]
    parts = pack_assets(work / "assets", selection, args.suites, budget - core_bytes, REQUIRED_ASSET_ENTRIES, notes)
    if not args.no_verify:
        log("verifying: every scene of each part builds from that part and the trimmed robosuite alone")
        verify_bundle(parts, robosuite_wheel)
    part_records = [file_record(p["path"], work, scenes=p["scenes"], files=p["files"], raw_bytes=p["raw_bytes"],
                                seconds=p["seconds"]) for p in parts]
    transfers = plan_transfers(part_records, core_bytes, budget)
    total = core_bytes + sum(p["bytes"] for p in part_records)
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "builder": {"python": platform.python_version(), "platform": platform.platform(), "commit": _commit()},
        "target": {"python_version": args.python_version, "python_tag": f"cp{args.python_version.replace('.', '')}",
                   "platforms": args.platform},
        "suites": args.suites,
        "assets_source": str(source),
        "compression": "xz -9",
        "budget_bytes": budget,
        "core_bytes": core_bytes,
        "total_bytes": total,
        "transfers": transfers,
        "node_packages": str(args.node_packages),
        "wheels": wheels,
        "robosuite_trim": trim_stats,
        "gl_debs": gl,
        "asset_parts": part_records,
        "asset_notes": notes,
        "verified": not args.no_verify,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    log(f"wrote {out}: {total / 2**20:.1f} MiB in all (core {core_bytes / 2**20:.1f} MiB + "
        f"{len(part_records)} asset parts) in {time.perf_counter() - started:.0f} s")
    for number, names in enumerate(transfers, 1):
        size = core_bytes + sum(p["bytes"] for p in part_records if p["file"] in names)
        log(f"  transfer {number}: core + {' + '.join(names)} = {size / 2**20:.1f} MiB")
    return 0


def _commit() -> str | None:
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or None


if __name__ == "__main__":
    if sys.argv[1:2] == ["verify-part"]:  # verify_bundle's subprocess
        sys.exit(verify_part_main(sys.argv[2], sys.argv[3:]))
    sys.exit(main())
