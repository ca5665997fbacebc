"""Action-speed controller: is the arm making a coarse move or a fine, precise one?

Fed every EXECUTED action (env units) of one stream, in order:
    v = |a[0:3]|, v_xy = |a[0:2]|, v_z = a[2] (signed), v_rot = |a[3:6]|
    coarse -> fine  when v < fine_speed, or (v_xy < fine_xy and v_z < fine_z and v_rot < fine_rot);
                    with actions still queued this asks for a flush (drop the queue, re-plan now)
    fine -> coarse  when v_z > coarse_z, or v_rot > coarse_rot at a chunk boundary (queue empty)
The first `warmup_steps` actions of an episode only count; the mode stays coarse. The gripper is not used.
Fine mode raises the kept-token budget (the wrapper picks topk_fine / max_static_fine).
"""

from __future__ import annotations

import numpy as np

from .config import ControllerConfig

COARSE, FINE = "coarse", "fine"


class ActionController:
    def __init__(self, cfg: ControllerConfig):
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self.fine = False
        self.steps = 0  # executed actions seen this episode

    @property
    def mode(self) -> str:
        return FINE if self.fine else COARSE

    def observe(self, action, queue_empty: bool) -> bool:
        """Updates the mode from one executed action; True = flush the queued actions and re-plan."""
        self.steps += 1
        c = self.cfg
        if not c.enabled or self.steps <= c.warmup_steps:
            return False
        a = np.asarray(action, dtype=np.float64)
        v, v_xy, v_z, v_rot = np.linalg.norm(a[0:3]), np.linalg.norm(a[0:2]), a[2], np.linalg.norm(a[3:6])
        if self.fine:
            if v_z > c.coarse_z or (v_rot > c.coarse_rot and queue_empty):
                self.fine = False
            return False
        if v < c.fine_speed or (v_xy < c.fine_xy and v_z < c.fine_z and v_rot < c.fine_rot):
            self.fine = True
            return c.flush_on_fine and not queue_empty
        return False
