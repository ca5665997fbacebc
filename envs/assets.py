"""Which asset files LIBERO scenes load: the file selection behind the offline bundle.

    from vla_accel.envs.assets import select_suites, robosuite_asset_files
    selection = select_suites(["libero_spatial"], "../shared/libero-assets")
    selection.files                              # paths relative to the asset folder, sorted
    selection.scenes["libero_spatial/0"]         # what one scene (suite/task_id) needs
    robosuite_asset_files()                      # paths under robosuite/models/assets that LIBERO's Panda needs

A scene (one BDDL file) loads, in hf-libero's code:
  - its problem class's scene XML (the class's `scene_xml`, under the asset folder) and the floor and
    wall textures of its `floor_style` / `wall_style`: the arena swaps them in, beside the XML's own;
  - one object XML per fixture and object in the BDDL file (LIBERO's object registry names it); the
    fixture that is the workspace itself (the table, the floor, ...) is part of the scene XML;
  - every file those XMLs reference: `file=` attributes resolved against the XML's own folder (as
    robosuite does, `meshdir` plays no part), and `<include>`d XMLs, recursively.
The problem class's constants are read from its source (`ast`), the object files from LIBERO's own
classes: nothing is guessed from folder names, and what no XML names is left out. A referenced file
that does not exist is an error naming the scene and the XML that references it (`MissingAssetsError`).

`compiled_scene_files` is the check from the other side: it builds a scene in robosuite without a
renderer (MuJoCo compiles the model, so every file must load) and returns the files the compiled model
references; `check_scenes_compile` runs it over scenes and reports what fails. The bundle script runs
that on every asset part it packed, with its trimmed robosuite.

Needs hf-libero, robosuite and MuJoCo installed (imported on first use); nothing here renders.
"""

import ast
import functools
import inspect
import os
import re
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from .libero_setup import configure_libero, import_libero_envs, make_benchmark

# MJCF attributes that name a file (`file` on meshes, textures, hfields, skins, includes; the six
# cube-face files of a texture).
FILE_ATTRIBUTES = ("file", "fileright", "fileleft", "fileup", "filedown", "filefront", "fileback")


class MissingAssetsError(FileNotFoundError):
    """Scenes reference files that the asset folder lacks; the message lists each with its referrer."""

    def __init__(self, root: Path, missing: list[tuple[str, str]]):
        self.root, self.missing = root, missing
        lines = "\n".join(f"  {who}: {what}" for who, what in missing)
        super().__init__(f"{root} lacks {len(missing)} file(s) that scenes reference:\n{lines}")


@dataclass
class AssetSelection:
    """The files each scene needs, relative to `root` (posix paths)."""

    root: Path
    scenes: dict[str, frozenset[str]] = field(default_factory=dict)  # "suite/task_id" -> files

    @property
    def files(self) -> list[str]:
        return sorted(set().union(*self.scenes.values()))

    def files_of(self, scene_keys) -> list[str]:
        """The union of the files of some scenes (keys of `scenes`)."""
        unknown = [key for key in scene_keys if key not in self.scenes]
        if unknown:
            raise KeyError(f"no scenes {unknown} in this selection; it has {sorted(self.scenes)}")
        return sorted(set().union(*(self.scenes[key] for key in scene_keys)))

    def size_bytes(self, files=None) -> int:
        return sum((self.root / name).stat().st_size for name in (self.files if files is None else files))


# ---- MJCF references -----------------------------------------------------------------------------------


def mjcf_references(xml_file: Path) -> list[Path]:
    """Every file an MJCF file names (meshes, textures, includes, ...), resolved against the file's folder
    as robosuite does; absolute paths stay. Raises ValueError naming the file if it is not well-formed."""
    xml_file = Path(xml_file)
    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{xml_file} is not well-formed XML: {err}") from None
    return [
        Path(os.path.normpath(xml_file.parent / element.get(attribute)))
        for element in root.iter()
        for attribute in FILE_ATTRIBUTES
        if element.get(attribute)
    ]


def _relative(path: Path, base: Path) -> str | None:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return None


def walk_mjcf(roots: list[tuple[str, Path]], base: Path) -> tuple[set[str], list[tuple[str, str]]]:
    """The files that roots need, relative to `base`: each root, what it references and, for XML files
    (an `<include>` is one), what they reference in turn.

    roots: (who, path) pairs; `who` names the root in the missing list, and a root need not be an XML
    (the arena's textures are added as roots). Returns (files, missing), missing as (who,
    "<referring xml> -> <absent file>") pairs. A file outside `base` is a ValueError: no bundle of
    that folder could ship it.
    """
    base = Path(os.path.normpath(base))
    files, missing = set(), []
    for who, root in roots:
        stack, seen = [(Path(os.path.normpath(root)), None)], set()
        while stack:
            path, referrer = stack.pop()
            if path in seen:
                continue
            seen.add(path)
            name = _relative(path, base)
            if name is None:
                raise ValueError(f"{who}: {referrer or 'the root'} names {path}, which is outside {base}")
            if not path.is_file():
                missing.append((who, f"{referrer} -> {name}" if referrer else name))
                continue
            files.add(name)
            if path.suffix.lower() == ".xml":
                stack += [(reference, name) for reference in mjcf_references(path)]
    return files, missing


# ---- LIBERO scenes ---------------------------------------------------------------------------------------


def _libero_envs(assets_root: Path):
    # Points hf-libero's get_assets_path() at the folder: object classes build their XML paths from it.
    configure_libero(assets_root)
    return import_libero_envs()


@functools.cache
def _problem_constants(problem_class) -> dict:
    """scene_xml, floor_style, wall_style and every string constant of a LIBERO problem class's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(problem_class)))
    found = {"strings": set()}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found["strings"].add(node.value)
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                    if key.value in ("scene_xml", "floor_style", "wall_style") and isinstance(value.value, str):
                        found[key.value] = value.value
    absent = [key for key in ("scene_xml", "floor_style", "wall_style") if key not in found]
    if absent:
        raise ValueError(
            f"could not read {', '.join(absent)} from the source of LIBERO problem class "
            f"{problem_class.__module__}.{problem_class.__name__} (hf-libero changed?)"
        )
    return found


def scene_roots(bddl_file, assets_root) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """The XMLs and arena textures one scene starts from, as (what, path); plus objects that failed to load.

    The second list holds (what, error) for objects whose XML LIBERO could not read (a missing file).
    """
    assets_root = Path(assets_root)
    envs = _libero_envs(assets_root)
    from libero.libero.envs import bddl_utils
    from libero.libero.envs.arenas.style import get_texture_filename
    from libero.libero.envs.objects import get_object_dict, get_object_fn

    problem = bddl_utils.robosuite_parse_problem(str(bddl_file))
    name = problem["problem_name"]
    if name not in envs.TASK_MAPPING:
        raise ValueError(f"{bddl_file}: unknown LIBERO problem {name!r}; known: {sorted(envs.TASK_MAPPING)}")
    constants = _problem_constants(envs.TASK_MAPPING[name])
    scene_xml = assets_root / constants["scene_xml"]
    roots = [(f"scene {constants['scene_xml']}", scene_xml)]
    if scene_xml.is_file():
        # The arena replaces the file name of the textures named texplane / tex-wall, keeping the folder.
        styles = {"texplane": ("floor", constants["floor_style"]), "tex-wall": ("wall", constants["wall_style"])}
        for element in ET.parse(scene_xml).getroot().iter("texture"):
            if element.get("name") in styles and element.get("file"):
                kind, style = styles[element.get("name")]
                folder = Path(os.path.normpath(scene_xml.parent / element.get("file"))).parent
                roots.append((f"{kind} style {style!r}", folder / get_texture_filename(type=kind, style=style)))

    registry, failed = get_object_dict(), []
    for kind in ("fixtures", "objects"):
        for category, instances in problem[kind].items():
            if category.lower() not in registry:
                if kind == "fixtures" and category in constants["strings"]:
                    continue  # the workspace fixture: the problem class skips it, the scene XML holds it
                raise ValueError(f"{bddl_file}: {kind[:-1]} category {category!r} is not in LIBERO's object registry")
            for instance in instances:
                try:
                    obj = get_object_fn(category)(name=instance)
                except OSError as err:  # robosuite reads the object's XML on construction
                    failed.append((f"{kind[:-1]} {instance} ({category})", str(err)))
                    continue
                roots.append((f"{kind[:-1]} {instance} ({category})", Path(obj.file)))
    return roots, failed


def suite_scenes(suites, task_ids=None) -> dict[str, Path]:
    """{"suite/task_id": BDDL file} for the suites' tasks (all tasks when task_ids is None)."""
    from .libero import validate_selection

    scenes = {}
    for suite in suites:
        validate_selection(suite, task_ids, None)
        benchmark = make_benchmark(suite)
        for task_id in range(benchmark.n_tasks) if task_ids is None else task_ids:
            scenes[f"{suite}/{task_id}"] = Path(benchmark.get_task_bddl_file_path(task_id))
    return scenes


def select_scenes(scenes: dict[str, Path], assets_root) -> AssetSelection:
    """The asset files of each scene ({key: BDDL file}); raises MissingAssetsError listing every absent file."""
    assets_root = Path(assets_root).resolve()
    selection, missing = AssetSelection(assets_root), []
    for key, bddl_file in scenes.items():
        roots, failed = scene_roots(bddl_file, assets_root)
        files, absent = walk_mjcf(roots, assets_root)
        selection.scenes[key] = frozenset(files)
        missing += [(f"{key} {who}", what) for who, what in failed + absent]
    if missing:
        raise MissingAssetsError(assets_root, missing)
    return selection


def select_suites(suites, assets_root, task_ids=None) -> AssetSelection:
    """`select_scenes` over every task of the suites (or the given task ids)."""
    return select_scenes(suite_scenes(suites, task_ids), assets_root)


# ---- robosuite's own assets --------------------------------------------------------------------------------


def robosuite_assets_root() -> Path:
    import robosuite.models

    return Path(robosuite.models.assets_root).resolve()


def robosuite_asset_files() -> list[str]:
    """Files under robosuite/models/assets that LIBERO scenes load: the world's base XML and, for each of
    LIBERO's robot models (the Panda, mounted or on the ground), its XML, its default mount and gripper.

    XML files that robosuite's Python code opens itself are found only through these roots: check a
    trimmed robosuite by building scenes with it (build_offline_bundle.py's verification does)."""
    import robosuite.models.robots
    from libero.libero.envs import robots as libero_robots
    from robosuite.models.grippers import gripper_factory
    from robosuite.models.mounts import mount_factory
    from robosuite.models.world import MujocoWorldBase

    roots = [("world", Path(MujocoWorldBase().file))]
    for name, cls in inspect.getmembers(libero_robots, inspect.isclass):
        is_robot = issubclass(cls, robosuite.models.robots.RobotModel)
        if not (is_robot and cls.__module__.startswith(libero_robots.__name__)):
            continue
        robot = cls()
        # As robosuite's Robot.load_model does: a mount always (None gives its NullMount, an XML too), and
        # the default gripper.
        roots += [
            (f"robot {name}", Path(robot.file)),
            (f"robot {name} mount", Path(mount_factory(robot.default_mount).file)),
            (f"robot {name} gripper", Path(gripper_factory(robot.default_gripper).file)),
        ]
    files, missing = walk_mjcf(roots, robosuite_assets_root())
    if missing:
        raise MissingAssetsError(robosuite_assets_root(), missing)
    return sorted(files)


# ---- the check from the other side: what MuJoCo actually compiles ----------------------------------------


def compiled_scene_files(bddl_file, assets_root) -> set[Path]:
    """Every file the compiled model of a scene references (absolute, normalised), built without a renderer."""
    _libero_envs(Path(assets_root).resolve())
    from libero.libero.envs.env_wrapper import ControlEnv

    env = ControlEnv(str(bddl_file), has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False)
    try:
        xml = env.env.model.get_xml()
    finally:
        env.env.close()
    names = re.findall(rf'\b(?:{"|".join(FILE_ATTRIBUTES)})="([^"]+)"', xml)
    return {Path(os.path.normpath(name)) for name in names}


def check_scenes_compile(scenes: dict[str, Path], assets_root) -> list[str]:
    """Build each scene ({key: BDDL file}) without a renderer against an asset folder; problems as text.

    A file that the folder (or robosuite's assets) lacks makes robosuite or MuJoCo fail, which is
    reported with the scene; so is a compiled model that references files outside the two folders.
    """
    assets_root = Path(assets_root).resolve()
    allowed = (assets_root, robosuite_assets_root())
    problems = []
    for key, bddl_file in scenes.items():
        try:
            files = compiled_scene_files(bddl_file, assets_root)
        except Exception as err:  # any failure to build is the finding
            problems.append(f"{key}: {type(err).__name__}: {err}")
            continue
        outside = sorted(str(path) for path in files if all(_relative(path, root) is None for root in allowed))
        if outside:
            problems.append(f"{key}: the compiled model uses files outside {assets_root} and robosuite's assets: "
                            f"{outside}")
    return problems
