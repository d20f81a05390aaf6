"""RoboArena's policy-server protocol (`serving.protocol: roboarena`): what DROID robots' evaluation client speaks,
and DreamZero's own DROID server with it.

The same websocket and msgpack-numpy frames as openpi's, with three differences, each handled here or by the server:
- on connect the server sends RoboArena's `PolicyServerConfig`, exactly its fields: the image size the client
  resizes to, whether the wrist camera and how many exterior cameras are wanted, whether a session id is, and the
  action space (the client commands the robot in it, 15 Hz, gripper binarised at 0.5);
- each request names its endpoint: `{"endpoint": "infer", "observation/...": ..., "prompt": ...}`, answered with a
  map holding `actions` (N, 8), or `{"endpoint": "reset", ...}`, answered with the text "reset successful";
- a request carries one frame per camera, the robot's current one, not the frames it saw while executing the last
  chunk that DreamZero's closed loop writes into the cache. Each infer therefore opens a new context window from its
  frame (the model's first-chunk mode): no frame is made up. (DreamZero's adapter pads its video with copies of
  frames instead.) A robot that can send every frame gets the whole closed loop over the openpi protocol.
The observation keys are DROID's (`observation/exterior_image_1_left`, `observation/joint_position`, ...): an
embodiment is served this way when its profile's request_keys map its cameras and state to them (the built-in
droid profile's do) and it declares a joint action space of 8 dims (7 joints + the gripper).
"""

from __future__ import annotations

from wam.platform.errors import ConfigError
from wam.trainer.data.transforms import view_places
from wam.trainer.serve.embodiments import ServedEmbodiment
from wam.trainer.serve.policy import RequestError

ROBOARENA = "roboarena"
WRIST = "observation/wrist_image_left"
EXTERIOR = ("observation/exterior_image_1_left", "observation/exterior_image_2_left")
STATE = ("observation/joint_position", "observation/gripper_position")
JOINT_ACTION_SPACES = ("joint_position", "joint_velocity")  # what its client commands
ACTION_DIMS = 8
RESET_REPLY = "reset successful"


def server_config(embodiment: ServedEmbodiment, canvas: tuple[int, int]) -> dict:
    """What a RoboArena client is sent on connect, for `embodiment` served on a (H, W) canvas; ConfigError where the
    embodiment cannot be served over this protocol, naming why."""
    p = embodiment.profile
    sent = [p.request_keys.get(camera, (camera,))[0] for camera in p.cameras]
    exterior = [key for key in sent if key in EXTERIOR]
    state = [key for state_key in p.state_keys for key in p.request_keys.get(state_key, (state_key,))]
    problems = []
    if unknown := [key for key in sent if key != WRIST and key not in EXTERIOR]:
        problems.append(f"its cameras arrive as {unknown}, which are not RoboArena's ({WRIST}, {', '.join(EXTERIOR)}): "
                        "map them in the profile's request_keys")
    elif sorted(exterior) != list(EXTERIOR[:len(exterior)]):
        problems.append(f"RoboArena sends its exterior cameras in order ({', '.join(EXTERIOR)}), the profile takes "
                        f"{exterior}")
    if state != list(STATE):
        problems.append(f"its state arrives as {state}, RoboArena sends {list(STATE)}")
    if p.action_space not in JOINT_ACTION_SPACES:
        problems.append(f"its profile's action_space is {p.action_space or 'not declared'}; RoboArena commands "
                        f"{' or '.join(JOINT_ACTION_SPACES)}")
    if len(embodiment.envelope.low) != ACTION_DIMS:
        problems.append(f"its actions have {len(embodiment.envelope.low)} dims, RoboArena's {ACTION_DIMS} (7 joints + "
                        "the gripper)")
    if problems:
        raise ConfigError(f"embodiment {p.name} cannot be served over RoboArena's protocol (serving.protocol): "
                          + "; ".join(problems))
    sizes = [(h, w) for _, _, h, w in view_places(p.layout, canvas)[:len(p.cameras)]]
    return {"image_resolution": max(sizes, key=lambda size: size[0] * size[1]),  # no view is enlarged from it
            "needs_wrist_camera": WRIST in sent, "n_external_cameras": len(exterior), "needs_stereo_camera": False,
            "needs_session_id": False,  # a session is its connection
            "action_space": p.action_space}


def endpoint_of(request: object) -> tuple[str, dict]:
    """A RoboArena request's endpoint ("infer" or "reset") and its observations (its session id left out)."""
    if not isinstance(request, dict):
        raise RequestError(f"a request is a msgpack map of observations, got {type(request).__name__}")
    endpoint = request.get("endpoint")
    if endpoint not in ("infer", "reset"):
        raise RequestError(f'a RoboArena request names its "endpoint": "infer" or "reset", got {endpoint!r}'[:200])
    return endpoint, {k: v for k, v in request.items() if k not in ("endpoint", "session_id")}
