"""vla_accel.envs.assets: which LIBERO asset files a suite's scenes need (the offline bundle's selection).

    pytest tests/test_envs_assets.py     # about half a minute on 2 CPU cores; builds no wheels, renders nothing

The MJCF walker is tested on small made-up files. The LIBERO tests need hf-libero + robosuite and the
LIBERO asset folder ($VLA_ACCEL_LIBERO_ASSETS, else <repo>/../shared/libero-assets) and skip without
them. Their reference is what MuJoCo compiles: a scene built by robosuite (no renderer) names every mesh
and texture it loaded, independently of how the selection found them.
"""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from vla_accel.envs import ASSETS_ENV_VAR
from vla_accel.envs.assets import (
    MissingAssetsError,
    compiled_scene_files,
    robosuite_asset_files,
    robosuite_assets_root,
    select_scenes,
    select_suites,
    suite_scenes,
    walk_mjcf,
)

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get(ASSETS_ENV_VAR) or REPO.parent / "shared" / "libero-assets")
HAVE_LIBERO = all(importlib.util.find_spec(m) is not None for m in ("libero", "robosuite", "mujoco"))
requires_libero_assets = pytest.mark.skipif(
    not (HAVE_LIBERO and ASSETS.is_dir()), reason=f"needs hf-libero, robosuite, mujoco and LIBERO assets at {ASSETS}"
)

# One scene of each problem class (and so scene XML) the two suites use: a table top and the floor.
SCENES = ["libero_spatial/0", "libero_object/0"]


# ---- the MJCF walker on made-up files ---------------------------------------------------------------------------


def _write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_walk_resolves_against_each_xml_folder_and_follows_includes(tmp_path):
    # meshdir plays no part: robosuite makes every file= absolute against the XML's own folder.
    _write(tmp_path / "objects" / "cup" / "visual" / "cup.msh")
    _write(tmp_path / "objects" / "cup" / "texture.png")
    _write(tmp_path / "textures" / "wood.png")
    _write(tmp_path / "objects" / "cup" / "parts" / "handle.xml",
           '<mujoco><asset><mesh file="../visual/cup.msh"/></asset></mujoco>')
    root = _write(tmp_path / "objects" / "cup" / "cup.xml",
                  '<mujoco><compiler meshdir="nowhere/"/><include file="parts/handle.xml"/>'
                  '<asset><texture file="texture.png" name="t"/><texture file="../../textures/wood.png" name="w"/>'
                  '<mesh file="visual/cup.msh"/></asset></mujoco>')
    _write(tmp_path / "objects" / "unused" / "unused.png")

    files, missing = walk_mjcf([("cup", root)], tmp_path)
    assert missing == []
    assert files == {
        "objects/cup/cup.xml",
        "objects/cup/parts/handle.xml",
        "objects/cup/texture.png",
        "objects/cup/visual/cup.msh",
        "textures/wood.png",
    }


def test_walk_lists_every_absent_file_with_its_referrer(tmp_path):
    root = _write(tmp_path / "scene.xml", '<mujoco><asset><mesh file="a.stl"/><texture file="b/c.png"/></asset>'
                  '<include file="more.xml"/></mujoco>')
    files, missing = walk_mjcf([("scene 1", root), ("scene 2", tmp_path / "other.xml")], tmp_path)
    assert files == {"scene.xml"}
    assert sorted(missing) == [
        ("scene 1", "scene.xml -> a.stl"),
        ("scene 1", "scene.xml -> b/c.png"),
        ("scene 1", "scene.xml -> more.xml"),
        ("scene 2", "other.xml"),
    ]


def test_walk_refuses_files_outside_the_folder(tmp_path):
    _write(tmp_path / "outside.png")
    root = _write(tmp_path / "assets" / "scene.xml", '<mujoco><asset><texture file="../outside.png"/></asset></mujoco>')
    with pytest.raises(ValueError, match=r"scene\.xml names .*outside\.png, which is outside"):
        walk_mjcf([("scene", root)], tmp_path / "assets")


def test_walk_names_a_broken_xml(tmp_path):
    root = _write(tmp_path / "scene.xml", "<mujoco><asset>")
    with pytest.raises(ValueError, match=r"scene\.xml is not well-formed XML"):
        walk_mjcf([("scene", root)], tmp_path)


# ---- LIBERO's scenes against what MuJoCo compiles ----------------------------------------------------------------


@pytest.fixture(scope="module")
def selection():
    return select_suites(["libero_spatial", "libero_object"], ASSETS)


@pytest.fixture(scope="module")
def compiled():
    # {scene: (LIBERO asset files, robosuite asset files)} the compiled models reference, relative paths.
    scenes = {**suite_scenes(["libero_spatial"], [0]), **suite_scenes(["libero_object"], [0])}
    root, rs_root = ASSETS.resolve(), robosuite_assets_root()
    result = {}
    for key, bddl_file in scenes.items():
        paths = compiled_scene_files(bddl_file, ASSETS)
        result[key] = (
            {p.relative_to(root).as_posix() for p in paths if p.is_relative_to(root)},
            {p.relative_to(rs_root).as_posix() for p in paths if p.is_relative_to(rs_root)},
        )
        assert all(p.is_relative_to(root) or p.is_relative_to(rs_root) for p in paths), key
    return result


@requires_libero_assets
@pytest.mark.parametrize("scene", SCENES)
def test_every_file_the_compiled_scene_loads_is_selected(selection, compiled, scene):
    loaded, _ = compiled[scene]
    assert loaded, "the compiled model names no LIBERO asset file: the reference itself is broken"
    assert loaded <= selection.scenes[scene]


@requires_libero_assets
@pytest.mark.parametrize("scene", SCENES)
def test_nothing_is_selected_that_the_scene_does_not_load_but_textures_it_declares(selection, compiled, scene):
    # The only files selected beyond what MuJoCo loads: the XMLs themselves, the floor and wall textures
    # that the arena swaps out for its style's, and a texture whose name another one reuses.
    loaded, _ = compiled[scene]
    extra = {f for f in selection.scenes[scene] - loaded if not f.endswith(".xml")}
    assert all(f.endswith(".png") for f in extra), extra
    assert len(extra) <= 3, extra


@requires_libero_assets
def test_a_suite_does_not_take_files_only_other_suites_use(selection):
    # libero_object's groceries (the alphabet soup) appear in no libero_spatial task.
    spatial_bddl = " ".join(path.read_text() for path in suite_scenes(["libero_spatial"]).values())
    assert "alphabet_soup" not in spatial_bddl
    spatial = set(selection.files_of([k for k in selection.scenes if k.startswith("libero_spatial/")]))
    objects = set(selection.files_of([k for k in selection.scenes if k.startswith("libero_object/")]))
    assert any("alphabet_soup" in f for f in objects)
    assert not any("alphabet_soup" in f for f in spatial)
    assert select_suites(["libero_spatial"], ASSETS).files == sorted(spatial)


@requires_libero_assets
def test_robosuite_files_cover_the_compiled_robot_and_no_other_robot(compiled):
    kept = set(robosuite_asset_files())
    for scene, (_, loaded) in compiled.items():
        assert loaded and loaded <= kept, (scene, loaded - kept)
    assert {"robots/panda/robot.xml", "grippers/panda_gripper.xml", "base.xml"} <= kept
    assert not [f for f in kept if f.startswith("robots/") and not f.startswith("robots/panda/")]


@pytest.fixture
def mirror(tmp_path):
    """A copy of the asset folder made of symbolic links, from which a test may delete files."""
    shutil.copytree(ASSETS, tmp_path / "assets", symlinks=False, copy_function=os.symlink)
    return tmp_path / "assets"


@requires_libero_assets
def test_a_missing_texture_and_a_missing_object_are_named_with_their_scene(mirror):
    scene = suite_scenes(["libero_spatial"], [0])
    text = scene["libero_spatial/0"].read_text()
    assert "plate" in text and "akita_black_bowl" in text
    (mirror / "stable_scanned_objects" / "plate" / "texture.png").unlink()
    (mirror / "stable_scanned_objects" / "akita_black_bowl" / "akita_black_bowl.xml").unlink()
    with pytest.raises(MissingAssetsError) as caught:
        select_scenes(scene, mirror)
    message = str(caught.value)
    assert "lacks 3 file(s)" in message  # the texture, and the bowl's XML for each of its two instances
    assert "libero_spatial/0" in message
    assert "stable_scanned_objects/plate/plate.xml -> stable_scanned_objects/plate/texture.png" in message
    assert "(akita_black_bowl)" in message and "akita_black_bowl.xml" in message
    assert {who.split()[0] for who, _ in caught.value.missing} == {"libero_spatial/0"}
