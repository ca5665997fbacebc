"""The scripted expert (vla_accel.envs.expert) on synthetic scenes: no simulator.

A kinematic stand-in moves the gripper by 1 cm per step at action 1.0 (about what OSC_POSE does in
LIBERO), turns it by the rotation action, and lets a closed gripper carry an object it closed on.
The controller must go through its phases in order and put the object in the container; an object
that never comes up must end in regrasps and then DONE.
"""

import numpy as np
import pytest

from vla_accel.envs.expert import (
    CLOSE,
    OPEN,
    ExpertConfig,
    Phase,
    PickPlaceExpert,
    Scene,
    yaw_to_grasp,
)

# gripper pointing down, fingers (its x axis) along world y: LIBERO's Panda at rest
START_ROT = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
CONTAINER = (np.array([-0.08, 0.17, 0.0]), np.array([0.08, 0.35, 0.14]))


def rotvec_matrix(v: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(v)
    if angle < 1e-12:
        return np.eye(3)
    k = v / angle
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


class KinematicScene:
    """Gripper + one box-shaped object; `sticky=False` makes every grasp slip."""

    def __init__(self, size=(0.04, 0.08, 0.07), center=(0.03, -0.09), sticky=True):
        self.eef = np.array([-0.15, 0.0, 0.25])
        self.rot = START_ROT.copy()
        self.size = np.array(size)
        self.obj_lo = np.array([center[0] - size[0] / 2, center[1] - size[1] / 2, 0.0])
        self.sticky = sticky
        self.closed_steps = 0
        self.held = None  # object offset from the gripper while held

    def scene(self) -> Scene:
        return Scene(self.eef.copy(), self.rot.copy(), self.obj_lo.copy(), self.obj_lo + self.size, *CONTAINER)

    def step(self, action: np.ndarray) -> None:
        self.eef = self.eef + 0.01 * np.clip(action[:3], -1, 1)
        self.eef[2] = max(self.eef[2], 0.01)  # the floor
        self.rot = rotvec_matrix(0.5 * np.clip(action[3:6], -1, 1)) @ self.rot
        center = self.obj_lo + self.size / 2
        near = (np.linalg.norm(self.eef[:2] - center[:2]) < 0.02
                and self.obj_lo[2] <= self.eef[2] <= self.obj_lo[2] + self.size[2])
        self.closed_steps = self.closed_steps + 1 if action[6] == CLOSE else 0
        if self.held is None and self.sticky and near and self.closed_steps >= 3:
            self.held = self.obj_lo - self.eef
        if action[6] == OPEN and self.held is not None:  # released: falls straight down
            self.held = None
            self.obj_lo[2] = 0.01 if self._over_container() else 0.0
        if self.held is not None:
            self.obj_lo = self.eef + self.held

    def _over_container(self) -> bool:
        c = self.obj_lo[:2] + self.size[:2] / 2
        return bool(np.all(c > CONTAINER[0][:2]) and np.all(c < CONTAINER[1][:2]))

    def in_container(self) -> bool:
        return self.held is None and self._over_container() and self.obj_lo[2] < 0.05


def rollout(world: KinematicScene, steps: int = 300):
    expert = PickPlaceExpert()
    actions = []
    for _ in range(steps):
        a = expert.act(world.scene())
        actions.append(a)
        world.step(a)
        if world.in_container() and expert.phase == Phase.RETREAT:
            break
    return expert, np.array(actions)


def test_phases_in_order_and_object_placed():
    world = KinematicScene()
    expert, actions = rollout(world)
    phases = [p for _, p in expert.transitions]
    assert phases == [Phase.APPROACH, Phase.DESCEND, Phase.GRASP, Phase.LIFT, Phase.CARRY, Phase.LOWER,
                      Phase.RELEASE, Phase.RETREAT]
    assert world.in_container()
    assert expert.regrasps == 0
    steps = dict((p, s) for s, p in expert.transitions)
    # gripper open until the grasp phase, closed from grasp to lower, open again from release
    assert np.all(actions[:steps[Phase.GRASP], 6] == OPEN)
    assert np.all(actions[steps[Phase.GRASP]:steps[Phase.RELEASE], 6] == CLOSE)
    assert np.all(actions[steps[Phase.RELEASE]:, 6] == OPEN)
    assert steps[Phase.LIFT] - steps[Phase.GRASP] == ExpertConfig().grasp_steps
    assert np.all(np.abs(actions[:, :6]) <= 1.0)
    assert len(actions) < 200  # the real expert needs about 115-180 steps per libero_object task


def test_deterministic():
    _, a = rollout(KinematicScene())
    _, b = rollout(KinematicScene())
    np.testing.assert_array_equal(a, b)


def test_slipping_grasp_regrasps_then_gives_up():
    world = KinematicScene(sticky=False)
    expert, actions = rollout(world, steps=600)
    phases = [p for _, p in expert.transitions]
    cycle = [Phase.APPROACH, Phase.DESCEND, Phase.GRASP, Phase.LIFT]
    limit = ExpertConfig().max_regrasps
    assert phases == cycle * (limit + 1) + [Phase.DONE]
    assert expert.regrasps == limit + 1
    assert np.all(actions[-5:, :3] == 0) and np.all(actions[-5:, 6] == OPEN)  # holds still, open


@pytest.mark.parametrize("size,fingers", [
    ((0.08, 0.04, 0.02), (0.0, 1.0)),   # long in x: close along y (no turn needed)
    ((0.04, 0.08, 0.02), (1.0, 0.0)),   # long in y: turn a quarter, close along x
])
def test_yaw_to_grasp_closes_across_the_short_side(size, fingers):
    lo = np.zeros(3)
    rot = yaw_to_grasp(START_ROT, lo, lo + np.array(size))
    np.testing.assert_allclose(np.abs(rot[:2, 0]), fingers, atol=1e-12)
    np.testing.assert_allclose(rot[:, 2], START_ROT[:, 2], atol=1e-12)  # still pointing down
    angle = np.arccos(np.clip((np.trace(START_ROT.T @ rot) - 1) / 2, -1, 1))
    assert angle <= np.pi / 2 + 1e-9  # the smaller of the two turns that give the same grasp


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="pos_gain"):
        ExpertConfig(pos_gain=0)
    with pytest.raises(ValueError, match="hover"):
        ExpertConfig(hover=-0.1)
