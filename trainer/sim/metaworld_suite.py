"""Meta-World (MuJoCo 3) tasks, their scripted experts and offscreen cameras, behind one small class.

Object and goal positions are drawn by the environment's own reset from its seeded generator
(`env.seed(s)` before each reset), so an episode is fixed by its seed. Frames are rendered offscreen
through EGL (`MUJOCO_GL=egl`, Mesa's `libegl-mesa0` on Debian) without multisampling, shadows or
reflections: about 10x faster on a CPU renderer, and what a 64-128 px policy sees is the same scene.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import numpy as np

from wam.platform.errors import UserError

# MuJoCo picks its OpenGL backend when first imported (by metaworld too): offscreen EGL unless the user chose
os.environ.setdefault("MUJOCO_GL", "egl")

SUITE = "metaworld"
FPS = 80  # the control rate: MuJoCo's 2.5 ms step x frame_skip 5
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
STATE_NAMES = (
    "hand_x", "hand_y", "hand_z", "gripper_distance",
    *(f"object1_{k}" for k in ("x", "y", "z", "qw", "qx", "qy", "qz")),
    *(f"object2_{k}" for k in ("x", "y", "z", "qw", "qx", "qy", "qz")),
    *(f"previous_{i}" for i in range(18)),
    "goal_x", "goal_y", "goal_z",
)
ACTION_NAMES = ("delta_x", "delta_y", "delta_z", "gripper_effort")  # each in [-1, 1]
# Instructions for the common tasks; any other task's is its name in words ("dial-turn-v3" -> "dial turn").
INSTRUCTIONS = {
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}


def instruction(task: str) -> str:
    return INSTRUCTIONS.get(task, task.removesuffix("-v3").replace("-", " "))


def _quiet_egl_teardown() -> None:
    """PyOpenGL raises EGLError from MuJoCo's GLContext.__del__ when the interpreter tears EGL down first
    (harmless: the process is exiting), and a Renderer whose context failed to start raises AttributeError
    from its __del__ (the failure itself is reported); drop exactly those, keep every other one."""
    previous = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        if type(error).__name__ == "EGLError" or (isinstance(error, AttributeError) and "_mjr_context" in str(error)):
            return
        previous(unraisable)

    if not getattr(previous, "wam_quiet_egl", False):  # installed once
        hook.wam_quiet_egl = True
        sys.unraisablehook = hook


@contextlib.contextmanager
def _library_warnings_silenced():
    with warnings.catch_warnings():
        # the experts' gains exceed [-1, 1] by design (the env clips), and gymnasium's checker notes it
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high", category=UserWarning)
        warnings.filterwarnings("ignore", module="gymnasium.*")
        warnings.filterwarnings("ignore", module="glfw")  # a failed windowed backend: reported as a UserError
        yield


def _rendering_error(err: Exception) -> UserError:
    return UserError(f"offscreen rendering is unavailable with MUJOCO_GL={os.environ.get('MUJOCO_GL')}: "
                     f"{type(err).__name__}: {err}. Set MUJOCO_GL=egl and install Mesa's EGL "
                     "(Debian: apt-get install libegl-mesa0)")


def _expert_policies() -> dict:
    """metaworld's expert policies; importing metaworld loads MuJoCo's OpenGL backend, which can fail."""
    try:
        with _library_warnings_silenced():
            from metaworld.policies import ENV_POLICY_MAP
    except (ImportError, AttributeError, RuntimeError, OSError) as err:
        raise _rendering_error(err) from None
    return ENV_POLICY_MAP


def available_tasks() -> list[str]:
    return sorted(_expert_policies())


def check_tasks(tasks: list[str]) -> None:
    known = available_tasks()
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError(f"unknown Meta-World task(s) {', '.join(unknown)}; available: {', '.join(known)}")


def episode_seed(*keys: int) -> int:
    """The reset seed of one episode, drawn from its keys (e.g. the run's seed, the task's number, the episode)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def check_cameras(cameras: list[str]) -> None:
    unknown = [c for c in cameras if c not in CAMERAS]
    if unknown:
        raise UserError(f"unknown Meta-World camera(s) {', '.join(unknown)}; available: {', '.join(CAMERAS)}")


class MetaWorldTask:
    """One task's environment, its scripted expert and an offscreen renderer for `cameras`."""

    def __init__(self, task: str, cameras: tuple[str, ...], height: int, width: int):
        _quiet_egl_teardown()
        policies = _expert_policies()
        with _library_warnings_silenced():
            import metaworld
            import mujoco

            benchmark = metaworld.MT1(task, seed=0)
            self.env = benchmark.train_classes[task]()
            self.env.set_task(benchmark.train_tasks[0])
        # positions drawn by reset from the env's seeded generator, not frozen to the task's vector
        self.env._freeze_rand_vec = False
        self.env.seeded_rand_vec = True
        self.expert = policies[task]()
        self.task, self.cameras, self.max_steps = task, cameras, int(self.env.max_path_length)
        model = self.env.model
        model.vis.quality.offsamples = 0
        try:
            with _library_warnings_silenced():
                self.renderer = mujoco.Renderer(model, height, width)
        except Exception as err:
            raise _rendering_error(err) from None
        # Meta-World's corner cameras look down with their image's up axis pointing down (their frames come out
        # upside down): those views are turned by 180 degrees, so that the table is below the robot in every view.
        mujoco.mj_forward(model, self.env.data)
        self.turned = {c for c in cameras if model.cam_bodyid[model.camera(c).id] == 0
                       and self.env.data.cam_xmat[model.camera(c).id].reshape(3, 3)[2, 1] < 0}
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                     mujoco.mjtRndFlag.mjRND_SKYBOX):
            self.renderer.scene.flags[flag] = 0

    def reset(self, seed: int) -> np.ndarray:
        self.env.seed(seed)
        with _library_warnings_silenced():
            obs, _ = self.env.reset()
        return obs.astype(np.float32)

    def expert_action(self, obs: np.ndarray) -> np.ndarray:
        with _library_warnings_silenced():
            return np.asarray(self.expert.get_action(obs.astype(np.float64)), dtype=np.float32)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, bool, float]:
        """Execute one action: the observation after it, success, and the task's distance to its goal."""
        with _library_warnings_silenced():
            obs, _, _, _, info = self.env.step(np.asarray(action, dtype=np.float64))
        return obs.astype(np.float32), bool(info["success"]), float(info["obj_to_target"])

    def distance(self, obs: np.ndarray) -> float:
        """The task's distance to its goal (the hand's for reaching, the object's otherwise) in metres."""
        with _library_warnings_silenced():
            _, info = self.env.evaluate_state(obs.astype(np.float64), np.zeros(4))
        return float(info["obj_to_target"])

    def render(self) -> dict[str, np.ndarray]:
        views = {}
        for camera in self.cameras:
            self.renderer.update_scene(self.env.data, camera=camera)
            view = self.renderer.render()
            views[camera] = np.ascontiguousarray(view[::-1, ::-1] if camera in self.turned else view)
        return views

    def close(self) -> None:
        self.renderer.close()
        self.env.close()
