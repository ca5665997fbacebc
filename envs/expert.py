"""A scripted pick-and-place expert for LIBERO, driven by privileged simulator state.

    from vla_accel.envs import LiberoEnv
    from vla_accel.envs.expert import PickPlaceExpert, libero_scene
    env = LiberoEnv("libero_object", task_id=0)
    obs, info = env.reset(options={"episode": 0})
    expert = PickPlaceExpert()
    while True:
        action = expert.act(libero_scene(env))     # [7]: OSC_POSE deltas + gripper (-1 open, +1 close)
        obs, reward, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break

The controller (`PickPlaceExpert`) knows nothing about LIBERO: each step it gets a `Scene` (gripper
pose and opening, the world bounding boxes of the object to move and of its container) and answers
one action. Phases:

    approach -> descend -> grasp -> lift -> carry -> lower -> release -> retreat
       ^                             |        |                          |
       +---- regrasp (object not ----+--------+---- or not in the  ------+
             lifted / dropped)                      container after release

Positions follow a saturated proportional law (OSC_POSE here moves about 1 cm per step at action
1.0); the orientation is held at the one the gripper had at the first step (pointing down).
"Reached" means within a tolerance, or stalled (the error stopped shrinking: contact with the
object or the floor). Deterministic: the same scenes give the same actions.

`libero_scene(env)` reads a Scene from a LiberoEnv's simulator: the object and container of the
task's goal (`(In obj container_contain_region)` or `(On obj container)`, a single predicate), boxes
from their collision geoms. `StateOnlyLiberoEnv` is the same episode protocol without cameras (no
rendering: about 30x faster per step on CPU), for measuring the expert's success rate.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, fields

import numpy as np

from .libero import LiberoEnv, _benchmark, _seeded_global_numpy, quat2axisangle
from .libero_setup import configure_libero, import_libero_envs

OPEN, CLOSE = -1.0, 1.0  # gripper commands of the env


class Phase(str, enum.Enum):
    APPROACH = "approach"  # above the object, gripper open
    DESCEND = "descend"  # down to the grasp point
    GRASP = "grasp"  # close the gripper in place
    LIFT = "lift"  # straight up to the carry height
    CARRY = "carry"  # above the container at the carry height
    LOWER = "lower"  # down to the release height
    RELEASE = "release"  # open the gripper in place
    RETREAT = "retreat"  # straight up, gripper open
    DONE = "done"  # gave up (too many regrasps): hold still, gripper open


@dataclass(frozen=True)
class Scene:
    """What the expert sees at one step (world frame, metres)."""

    eef_pos: np.ndarray  # [3] grip site position
    eef_rot: np.ndarray  # [3, 3] grip site orientation (columns = its axes in the world)
    object_lo: np.ndarray  # [3] lower corner of the object's bounding box
    object_hi: np.ndarray  # [3] upper corner
    container_lo: np.ndarray  # [3] lower corner of the container's (or target surface's) bounding box
    container_hi: np.ndarray  # [3] upper corner


@dataclass(frozen=True)
class ExpertConfig:
    pos_gain: float = 15.0  # action per metre of position error (saturates at max_action)
    max_action: float = 1.0  # |position action| per axis
    rot_gain: float = 2.0  # action per radian of orientation error
    reach_tol: float = 0.01  # m: a target counts as reached within this distance ...
    stall_steps: int = 8  # ... or when the distance shrank by less than stall_eps over this many steps
    stall_eps: float = 0.002  # m
    hover: float = 0.08  # m above the object's top for the approach
    grasp_depth: float = 0.035  # m below the object's top where the fingers close ...
    grasp_min_height: float = 0.012  # ... but at least this high above the object's bottom
    grasp_steps: int = 12  # steps with the gripper closing before the lift
    min_carry_z: float = 0.25  # m: the carry height is at least this (clears the other objects)
    carry_clearance: float = 0.06  # m: held object's bottom above the container's top while carrying
    release_clearance: float = 0.02  # m: held object's bottom above the container's top at release
    lift_check: float = 0.02  # m the object must have risen after the lift, else regrasp
    release_steps: int = 10  # steps with the gripper opening
    retreat_height: float = 0.10  # m above the release height
    max_regrasps: int = 2  # then Phase.DONE
    rot_tol: float = 0.05  # rad: the descent starts once the gripper is turned this close to the grasp yaw

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            strict = f.name in ("pos_gain", "max_action", "reach_tol", "stall_steps")
            if value < 0 or (strict and value == 0):
                raise ValueError(f"ExpertConfig.{f.name} must be {'> 0' if strict else '>= 0'}, got {value}")


def orientation_error(rot: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World-frame rotation vector (small-angle) that turns `rot` toward `target` (both [3, 3])."""
    return 0.5 * sum(np.cross(rot[:, i], target[:, i]) for i in range(3))


def yaw_to_grasp(rot: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """`rot` turned about the world z axis so that the fingers (the grip site's x axis) close along the
    object's shorter horizontal side (world x or y of its bounding box); the smaller turn of the two."""
    fingers = rot[:2, 0]
    want = np.array([1.0, 0.0]) if hi[0] - lo[0] <= hi[1] - lo[1] else np.array([0.0, 1.0])
    angle = np.arctan2(want[1], want[0]) - np.arctan2(fingers[1], fingers[0])
    angle = (angle + np.pi / 2) % np.pi - np.pi / 2  # fingers are symmetric: a half turn is the same grasp
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ rot


@dataclass
class PickPlaceExpert:
    """Phase machine: Scene -> 7-D action. Call reset() before each episode."""

    cfg: ExpertConfig = field(default_factory=ExpertConfig)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.phase = Phase.APPROACH
        self.regrasps = 0
        self.steps_in_phase = 0
        self.transitions: list[tuple[int, Phase]] = [(0, Phase.APPROACH)]  # (step, phase entered)
        self._step = 0
        self._start_rot = None  # the gripper's orientation at the first step (pointing down)
        self._hold_rot = None  # orientation to keep: the start one, turned for the grasp
        self._grasp_pos = None  # eef position where the gripper closed
        self._grasp_offset = 0.0  # eef z minus object bottom at the grasp
        self._object_bottom_at_grasp = 0.0
        self._release_z = 0.0
        self._dist_history: list[float] = []

    # ---- targets derived from the scene
    def _grasp_point(self, s: Scene) -> np.ndarray:
        c = self.cfg
        xy = 0.5 * (s.object_lo[:2] + s.object_hi[:2])
        z = max(s.object_hi[2] - c.grasp_depth, s.object_lo[2] + c.grasp_min_height)
        return np.array([xy[0], xy[1], z])

    def _carry_z(self, s: Scene) -> float:
        return max(self.cfg.min_carry_z, s.container_hi[2] + self._grasp_offset + self.cfg.carry_clearance)

    def _container_xy(self, s: Scene) -> np.ndarray:
        return 0.5 * (s.container_lo[:2] + s.container_hi[:2])

    def _object_in_container(self, s: Scene) -> bool:
        center = 0.5 * (s.object_lo[:2] + s.object_hi[:2])
        return bool(np.all(center > s.container_lo[:2]) and np.all(center < s.container_hi[:2]))

    # ---- the machine
    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        self.steps_in_phase = 0
        self._dist_history = []
        self.transitions.append((self._step, phase))

    def _regrasp(self) -> None:
        self.regrasps += 1
        self._enter(Phase.APPROACH if self.regrasps <= self.cfg.max_regrasps else Phase.DONE)

    def _reached(self, dist: float) -> bool:
        c = self.cfg
        self._dist_history.append(dist)
        if dist < c.reach_tol:
            return True
        h = self._dist_history
        return len(h) > c.stall_steps and h[-1 - c.stall_steps] - h[-1] < c.stall_eps

    def _target(self, s: Scene) -> tuple[np.ndarray, float]:
        """Advances the phase machine on this scene; returns (eef target position, gripper command)."""
        c = self.cfg
        eef = s.eef_pos
        for _ in range(len(Phase)):  # a phase may be finished on arrival: move on within this step
            phase = self.phase
            if phase == Phase.APPROACH:
                if self.steps_in_phase == 0:
                    self._hold_rot = yaw_to_grasp(self._start_rot, s.object_lo, s.object_hi)
                g = self._grasp_point(s)
                target, grip = np.array([g[0], g[1], s.object_hi[2] + c.hover]), OPEN
                # above the object and turned before the descent
                turned = np.linalg.norm(orientation_error(s.eef_rot, self._hold_rot)) < c.rot_tol
                above = np.linalg.norm(target[:2] - eef[:2]) < c.reach_tol
                if self._reached(float(np.linalg.norm(target - eef))) and above and turned:
                    self._enter(Phase.DESCEND)
                    continue
            elif phase == Phase.DESCEND:
                target, grip = self._grasp_point(s), OPEN
                if self._reached(float(np.linalg.norm(target - eef))):
                    self._grasp_pos = eef.copy()
                    self._grasp_offset = float(eef[2] - s.object_lo[2])
                    self._object_bottom_at_grasp = float(s.object_lo[2])
                    self._enter(Phase.GRASP)
                    continue
            elif phase == Phase.GRASP:
                target, grip = self._grasp_pos, CLOSE
                if self.steps_in_phase >= c.grasp_steps:
                    self._enter(Phase.LIFT)
                    continue
            elif phase == Phase.LIFT:
                target, grip = np.array([self._grasp_pos[0], self._grasp_pos[1], self._carry_z(s)]), CLOSE
                if self._reached(abs(float(target[2] - eef[2]))):
                    if s.object_lo[2] - self._object_bottom_at_grasp < c.lift_check:
                        self._regrasp()
                    else:
                        self._enter(Phase.CARRY)
                    continue
            elif phase == Phase.CARRY:
                xy = self._container_xy(s)
                target, grip = np.array([xy[0], xy[1], self._carry_z(s)]), CLOSE
                if s.object_lo[2] - self._object_bottom_at_grasp < c.lift_check:  # dropped on the way
                    self._regrasp()
                    continue
                if self._reached(float(np.linalg.norm(target - eef))):
                    self._release_z = float(s.container_hi[2] + self._grasp_offset + c.release_clearance)
                    self._enter(Phase.LOWER)
                    continue
            elif phase == Phase.LOWER:
                xy = self._container_xy(s)
                target, grip = np.array([xy[0], xy[1], self._release_z]), CLOSE
                if self._reached(float(np.linalg.norm(target - eef))):
                    self._enter(Phase.RELEASE)
                    continue
            elif phase == Phase.RELEASE:
                xy = self._container_xy(s)
                target, grip = np.array([xy[0], xy[1], self._release_z]), OPEN
                if self.steps_in_phase >= c.release_steps:
                    self._enter(Phase.RETREAT)
                    continue
            elif phase == Phase.RETREAT:
                xy = self._container_xy(s)
                target, grip = np.array([xy[0], xy[1], self._release_z + c.retreat_height]), OPEN
                if self._reached(abs(float(target[2] - eef[2]))) and not self._object_in_container(s):
                    self._regrasp()  # missed the container: pick it up again
                    continue
            else:  # DONE
                target, grip = eef.copy(), OPEN
            return target, grip
        raise RuntimeError(f"expert phase machine did not settle (phase {self.phase})")  # a bug, not a state

    def act(self, scene: Scene) -> np.ndarray:
        """One 7-D action: [dx, dy, dz, drx, dry, drz] in [-1, 1] (world frame), gripper -1 open / +1 close."""
        c = self.cfg
        if self._start_rot is None:
            self._start_rot = np.array(scene.eef_rot, dtype=np.float64)
        target, grip = self._target(scene)
        action = np.zeros(7)
        action[:3] = np.clip(c.pos_gain * (target - scene.eef_pos), -c.max_action, c.max_action)
        action[3:6] = np.clip(c.rot_gain * orientation_error(scene.eef_rot, self._hold_rot), -1.0, 1.0)
        action[6] = grip
        self.steps_in_phase += 1
        self._step += 1
        return action


# ---- reading a Scene from the LIBERO simulator ---------------------------------------------------------


def goal_objects(inner) -> tuple[str, str]:
    """(object to move, container or surface) of a LIBERO task's goal; a single In/On predicate."""
    goal = inner.parsed_problem["goal_state"]
    if len(goal) != 1 or len(goal[0]) != 3 or goal[0][0].lower() not in ("in", "on"):
        raise ValueError(f"the scripted expert handles goals of one (In obj region) or (On obj target) "
                         f"predicate; this task's goal is {goal}")
    _, obj, target = goal[0]
    for name in (target, target.removesuffix("_contain_region")):
        if name in inner.obj_body_id:
            return obj, name
    # a region of an object or fixture, e.g. "plate_1_..." -> the longest known name it starts with
    owners = [n for n in inner.obj_body_id if target.startswith(n)]
    if not owners:
        raise ValueError(f"goal target {target!r} names no object of the scene ({sorted(inner.obj_body_id)})")
    return obj, max(owners, key=len)


def body_geoms(model, body_id: int) -> np.ndarray:
    """Indices of the collision geoms of a body and its descendants."""
    parents = model.body_parentid
    in_tree = np.zeros(model.nbody, bool)
    in_tree[body_id] = True
    for b in range(body_id + 1, model.nbody):  # MuJoCo numbers children after their parents
        in_tree[b] = in_tree[parents[b]]
    collides = (model.geom_contype != 0) | (model.geom_conaffinity != 0)
    geoms = np.flatnonzero(in_tree[model.geom_bodyid] & collides)
    if geoms.size == 0:
        raise ValueError(f"body {model.body(body_id).name!r} has no collision geoms")
    return geoms


def geoms_aabb(model, data, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (lo [3], hi [3]) of the given geoms at the current state."""
    rot = data.geom_xmat[geoms].reshape(-1, 3, 3)  # [G, 3, 3]
    center = data.geom_xpos[geoms] + np.einsum("gij,gj->gi", rot, model.geom_aabb[geoms, :3])
    half = np.einsum("gij,gj->gi", np.abs(rot), model.geom_aabb[geoms, 3:])
    return (center - half).min(0), (center + half).max(0)


def _inner(env):
    sim = getattr(env.unwrapped, "_sim", None)
    if sim is None:
        raise RuntimeError("libero_scene() needs a LiberoEnv after reset() (its simulator is built on the first reset)")
    return sim.env


def libero_scene(env) -> Scene:
    """The expert's view of a reset LiberoEnv (privileged: read from the MuJoCo state)."""
    inner = _inner(env)
    model, data = inner.sim.model._model, inner.sim.data._data
    cache = getattr(inner, "_vla_accel_expert_geoms", None)
    if cache is None or cache[0] is not model:  # a hard reset builds a new model
        obj, container = goal_objects(inner)
        cache = (model, body_geoms(model, inner.obj_body_id[obj]), body_geoms(model, inner.obj_body_id[container]))
        inner._vla_accel_expert_geoms = cache
    site = inner.robots[0].eef_site_id
    object_lo, object_hi = geoms_aabb(model, data, cache[1])
    container_lo, container_hi = geoms_aabb(model, data, cache[2])
    return Scene(eef_pos=np.array(data.site_xpos[site]), eef_rot=np.array(data.site_xmat[site]).reshape(3, 3),
                 object_lo=object_lo, object_hi=object_hi, container_lo=container_lo, container_hi=container_hi)


class StateOnlyLiberoEnv(LiberoEnv):
    """LiberoEnv without cameras: the same episodes (init states, settle steps, success), no rendering.

    Observation: {"state": float32 [8]}. For measuring the expert; the policy needs LiberoEnv.
    """

    def __init__(self, suite: str = "libero_object", task_id: int = 0, **kwargs):
        super().__init__(suite, task_id, image_size=1, **kwargs)
        from gymnasium import spaces

        self.observation_space = spaces.Dict({"state": self.observation_space["state"]})

    def _build_sim(self):
        configure_libero(self.assets_path)
        import_libero_envs()
        from libero.libero.envs.env_wrapper import ControlEnv

        bddl_file = _benchmark(self.suite).get_task_bddl_file_path(self.task_id)
        with _seeded_global_numpy(self.sim_seed):
            self._sim = ControlEnv(bddl_file_name=bddl_file, camera_names=[], has_renderer=False,
                                        has_offscreen_renderer=False, use_camera_obs=False,
                                        horizon=max(1000, self.settle_steps + self.max_steps))
        self._sim_task = (self.suite, self.task_id)
        self._sim_pid = os.getpid()

    def _observation(self, raw) -> dict:
        state = np.concatenate([raw["robot0_eef_pos"], quat2axisangle(raw["robot0_eef_quat"]),
                                raw["robot0_gripper_qpos"]]).astype(np.float32)
        return {"state": state}
