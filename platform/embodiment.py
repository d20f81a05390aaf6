"""Embodiment profiles: how one robot's LeRobot dataset becomes WAM training samples, torch-free.

A profile names the camera streams (and how they tile into one frame), the state and action columns,
which action dims are relative to the chunk's first state, the action horizon of a chunk at the
recording rate, and the stride that takes the video to 5 fps. Built-in profiles follow DreamZero's
DROID and AgiBot setups; teams declare their own under `data.profiles` in the YAML config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from wam.platform.errors import ConfigError

LAYOUTS = ("droid", "grid", "single")
# what a profile's action columns command, where declared (RoboArena's DROID clients execute joint_* ones)
ACTION_SPACES = ("", "joint_position", "joint_velocity", "cartesian_position", "cartesian_velocity",
                 "end_effector_delta")
# The keys of DROID's own policy clients (openpi's DROID example, RoboArena's evaluation client): the built-in droid
# profile accepts them in place of its LeRobot keys
DROID_CLIENT_KEYS = {
    "observation.images.wrist_left": ("observation/wrist_image_left",),
    "observation.images.exterior_1_left": ("observation/exterior_image_1_left",),
    "observation.images.exterior_2_left": ("observation/exterior_image_2_left",),
    "observation.state": ("observation/joint_position", "observation/gripper_position"),
}


@dataclass(frozen=True)
class EmbodimentProfile:
    name: str
    cameras: tuple[str, ...]  # video feature keys, in tiling order
    layout: str  # droid: view 0 stretched across the top, views 1 and 2 below | grid: 2x2 | single
    state_keys: tuple[str, ...]  # concatenated into the state vector
    action_keys: tuple[str, ...] = ()  # concatenated into the action vector; () = video-only data
    relative_dims: tuple[int, ...] = ()  # action dims made relative to the same state dim at the chunk start
    action_horizon: int = 24  # actions per chunk at the recording rate
    video_stride: int = 3  # recording frames between the 5 fps video frames
    prompt: str = "{task}"  # how a task string becomes the prompt
    # The policy server's safety envelope, per action dim in robot units; empty: derived from the training data
    action_low: tuple[float, ...] = ()  # joint / command limits
    action_high: tuple[float, ...] = ()
    max_action_step: tuple[float, ...] = ()  # largest change between consecutive actions (velocity limit)
    gripper_dims: tuple[int, ...] = ()  # action dims of open/close grippers: served binarised (no step limit) ...
    gripper_threshold: float = 0.5  # ... to 1.0 above this value (robot units), else 0.0
    # Idle stretches left out of sampling: at least half a chunk of frames in which no action dim (state dim for
    # video-only data) changes by more than this per recording step, in the column's units. None: keep all.
    idle_threshold: float | None = None
    # Serving: request keys a robot may send in place of a camera or state key (a state key's are concatenated in
    # order), for clients that name their observations their own way (e.g. DROID's: DROID_CLIENT_KEYS)
    request_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    action_space: str = ""  # one of ACTION_SPACES ("": not declared)

    @property
    def has_actions(self) -> bool:
        return bool(self.action_keys)

    def request_sources(self, key: str, request: dict) -> tuple[str, ...] | None:
        """The request keys that carry camera or state `key` in `request`: the key itself, else its request_keys
        where all of them were sent; None where neither was."""
        if key in request:
            return (key,)
        aliases = self.request_keys.get(key, ())
        return aliases if aliases and all(a in request for a in aliases) else None

    def validate(self, pixel_frames_per_chunk: int) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"profile {self.name}: layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        limits = {"droid": 3, "grid": 4, "single": 1}
        if not 1 <= len(self.cameras) <= limits[self.layout]:
            raise ConfigError(f"profile {self.name}: the {self.layout} layout takes 1 to {limits[self.layout]} cameras, "
                              f"got {len(self.cameras)}")
        if not self.state_keys:
            raise ConfigError(f"profile {self.name}: state_keys must name at least one column")
        if self.video_stride * pixel_frames_per_chunk != self.action_horizon:
            raise ConfigError(
                f"profile {self.name}: a chunk's {pixel_frames_per_chunk} video frames at stride {self.video_stride} "
                f"span {self.video_stride * pixel_frames_per_chunk} recording steps, but action_horizon is "
                f"{self.action_horizon}; make video_stride x {pixel_frames_per_chunk} equal action_horizon")
        if "{task}" not in self.prompt:
            raise ConfigError(f"profile {self.name}: prompt must contain {{task}}")
        if len(self.action_low) != len(self.action_high) or any(lo >= hi for lo, hi in
                                                                zip(self.action_low, self.action_high, strict=False)):
            raise ConfigError(f"profile {self.name}: action_low and action_high must list the same number of dims, "
                              f"each low below its high; got {list(self.action_low)} and {list(self.action_high)}")
        if self.idle_threshold is not None and self.idle_threshold < 0:
            raise ConfigError(f"profile {self.name}: idle_threshold must be >= 0 (or null to keep idle frames), got "
                              f"{self.idle_threshold}")
        if any(d < 0 for d in self.gripper_dims):
            raise ConfigError(f"profile {self.name}: gripper_dims are action dim indices (>= 0), got "
                              f"{list(self.gripper_dims)}")
        if any(step <= 0 for step in self.max_action_step):
            raise ConfigError(f"profile {self.name}: max_action_step must be positive, got {list(self.max_action_step)}")
        if self.action_space not in ACTION_SPACES:
            raise ConfigError(f"profile {self.name}: action_space {self.action_space!r} is not one of "
                              f"{', '.join(repr(a) for a in ACTION_SPACES)}")
        self._validate_request_keys()

    def _validate_request_keys(self) -> None:
        inputs = (*self.cameras, *self.state_keys)
        if unknown := sorted(set(self.request_keys) - set(inputs)):
            raise ConfigError(f"profile {self.name}: request_keys names {unknown}, which are not among its cameras or "
                              f"state_keys {list(inputs)}")
        used = [a for aliases in self.request_keys.values() for a in aliases]
        if not all(isinstance(a, str) and a for a in used):
            raise ConfigError(f"profile {self.name}: request_keys must map each key to a list of non-empty strings")
        if clashes := sorted({a for a in used if used.count(a) > 1 or a in inputs}):
            raise ConfigError(f"profile {self.name}: request_keys {clashes} stand for more than one camera or state "
                              "key; give each its own")
        for camera in self.cameras:
            if camera in self.request_keys and len(self.request_keys[camera]) != 1:
                raise ConfigError(f"profile {self.name}: a camera is sent under one request key; request_keys gives "
                                  f"{camera} {list(self.request_keys[camera])}")


BUILTIN_PROFILES = {
    p.name: p
    for p in (
        # DROID (LeRobot port, 15 Hz): 7 joints + gripper; joints relative, gripper absolute.
        EmbodimentProfile(
            name="droid",
            cameras=("observation.images.wrist_left", "observation.images.exterior_1_left",
                     "observation.images.exterior_2_left"),
            layout="droid", state_keys=("observation.state",), action_keys=("action",),
            relative_dims=tuple(range(7)), action_horizon=24, video_stride=3, gripper_dims=(7,),
            request_keys=DROID_CLIENT_KEYS, action_space="joint_position",
        ),
        # AgiBot World (LeRobot port, 30 Hz): state [20] and the same 20 action dims + base velocity [2].
        EmbodimentProfile(
            name="agibot",
            cameras=("observation.images.top_head", "observation.images.hand_left", "observation.images.hand_right"),
            layout="grid", state_keys=("observation.state",), action_keys=("action",),
            relative_dims=tuple(range(20)), action_horizon=48, video_stride=6,
        ),
        # Meta-World (`wam sim record`, 80 Hz control): a fixed corner view and the gripper's view; state is the
        # 39-D observation, actions are already end-effector deltas + gripper effort, each clipped to [-1, 1].
        EmbodimentProfile(
            name="metaworld",
            cameras=("observation.images.corner", "observation.images.gripperPOV"),
            layout="grid", state_keys=("observation.state",), action_keys=("action",),
            relative_dims=(), action_horizon=32, video_stride=4,
            action_low=(-1.0,) * 4, action_high=(1.0,) * 4, action_space="end_effector_delta",
        ),
    )
}


# What a model trained on procedural latents (data.source synthetic) is served as: no robot, one camera, a state
# vector, normalised actions.
SYNTHETIC_PROFILE = EmbodimentProfile(name="synthetic", cameras=("observation.image",), layout="single",
                                      state_keys=("observation.state",))


@dataclass
class ProfileSection:
    """A profile declared in YAML (data.profiles.<name>); fields as EmbodimentProfile."""

    cameras: list[str] = field(default_factory=list)
    layout: str = "grid"
    state_keys: list[str] = field(default_factory=list)
    action_keys: list[str] = field(default_factory=list)
    relative_dims: list[int] = field(default_factory=list)
    action_horizon: int = 24
    video_stride: int = 3
    prompt: str = "{task}"
    action_low: list[float] = field(default_factory=list)
    action_high: list[float] = field(default_factory=list)
    max_action_step: list[float] = field(default_factory=list)
    gripper_dims: list[int] = field(default_factory=list)
    gripper_threshold: float = 0.5
    idle_threshold: float | None = None
    request_keys: dict[str, list[str]] = field(default_factory=dict)
    action_space: str = ""


def profile_from_fields(name: str, values: dict) -> EmbodimentProfile:
    """A profile from its fields as YAML or JSON hold them (lists for tuples); fields a newer version added and
    `values` lacks (a model quantized before) take their defaults."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    fields["request_keys"] = {k: tuple(v) for k, v in (values.get("request_keys") or {}).items()}
    return EmbodimentProfile(**fields | {"name": name})


def resolve_profile(name: str, declared: dict[str, ProfileSection]) -> EmbodimentProfile:
    if name in declared:
        return profile_from_fields(name, asdict(declared[name]))
    if name in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[name]
    raise ConfigError(f"unknown embodiment profile {name!r}; built in: {', '.join(BUILTIN_PROFILES)}; or declare it "
                      "under data.profiles")
