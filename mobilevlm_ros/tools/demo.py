"""mobilevlm-demo: the whole product in one command, over real DDS.

    mobilevlm-demo [--model models/tiny-v2-artifacts] [--question "What do you see?"] [--stream]
                   [--image-topic /camera/image_raw] [--params-file config/mobilevlm.yaml]
                   [--annotated-png answer.png]

1. starts the node process (`python -m mobilevlm_ros.ros.node`, the same program as
   `mobilevlm-node`) with the parameters file and model_path;
2. with no --image-topic, publishes a bundled sample source on the node's camera topic: synthetic
   moving frames (640x480 rgb8, a drifting gradient with a bouncing square and disc) at ~10 Hz;
   with --image-topic, remaps the node's default camera to that topic (a real camera);
3. asks the question through the node's ~/ask service (or the ~/ask_stream action with --stream)
   and prints the answer, the stamp of the frame it describes and the timings; for a model with
   random weights (the tiny one of scripts/setup.sh), one more line says the answer is random text;
   with --annotated-png, also subscribes to the node's ~/annotated and writes the answer drawn on
   its frame to that PNG file (asking again if the node had not seen the subscription yet);
4. shuts the node down (SIGINT, as Ctrl-C would) and checks that it exited cleanly.

Exit status 0 when the question was answered and the node stopped cleanly, 1 otherwise.
The node runs in the namespace /mobilevlm_demo so it never collides with a node already running.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..resources import share_file
from .make_tiny import has_random_decoder
from .synthetic import render_frame
from .traffic import NodeUnderTest

DEFAULT_MODELS = ("models/tiny-v2-artifacts", "models/tiny-v2")    # what scripts/setup.sh makes
RANDOM_NOTE = ("[the answer is random text: {model} is a test model with random weights (mobilevlm-make-tiny) "
               "that shows the plumbing only; for real answers see README.md, \"The real-model path\"]")


def image_msg(pixels: np.ndarray, stamp, frame_id: str = "demo_camera"):
    from sensor_msgs.msg import Image
    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = pixels.shape[:2]
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = pixels.shape[1] * 3
    msg.data = pixels.tobytes()
    return msg


def save_annotated(path, images: list, srv, req, wait_future, deadline) -> int:
    """Write the first ~/annotated image to `path` (PNG). The node draws only for subscribers it has
    matched: if none came within a few seconds of the answer, ask again."""
    import cv2
    for attempt in range(4):
        t_end = min(deadline, time.monotonic() + 5.0)
        while not images and time.monotonic() < t_end:
            time.sleep(0.1)
        if images:
            break
        if attempt < 3 and not wait_future(srv.call_async(req), deadline):
            break
    if not images:
        print("mobilevlm-demo: no image on ~/annotated", file=sys.stderr)
        return 1
    msg = images[0]
    bgr = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)
    if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        print(f"mobilevlm-demo: cannot write {path}", file=sys.stderr)
        return 1
    print(f"[annotated frame ({msg.width}x{msg.height}, {msg.encoding}) written to {path}]")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint or artifacts folder (default: models/tiny-v2-artifacts)")
    ap.add_argument("--question", default="What do you see in this image?")
    ap.add_argument("--params-file", default=None, help="default: config/mobilevlm.yaml of the package")
    ap.add_argument("--image-topic", default=None,
                    help="a real camera's sensor_msgs/Image topic; default: publish synthetic frames")
    ap.add_argument("--namespace", default="/mobilevlm_demo")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--stream", action="store_true", help="ask through the action, printing tokens")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for the node to start and answer")
    ap.add_argument("--quiet", action="store_true", help="do not echo the node's log")
    ap.add_argument("--annotated-png", default=None, metavar="PATH",
                    help="write the node's ~/annotated image of the answer (the frame with the answer drawn "
                         "on it) to this PNG file")
    a = ap.parse_args(argv)

    # default: the tiny model's export (ONNX Runtime vision + llama.cpp, the product path)
    model = Path(a.model) if a.model else next((Path(m) for m in DEFAULT_MODELS if Path(m).is_dir()), None)
    if model is None or not model.is_dir():
        print(f"mobilevlm-demo: model folder not found: {a.model or 'models/tiny-v2'} (pass --model; "
              f"`mobilevlm-make-tiny` makes a tiny one)", file=sys.stderr)
        return 1
    try:
        params = Path(a.params_file) if a.params_file else share_file("config", "mobilevlm.yaml")
    except FileNotFoundError:
        params = None
    if params is None or not params.is_file():
        print(f"mobilevlm-demo: parameters file not found: {a.params_file or 'config/mobilevlm.yaml'}",
              file=sys.stderr)
        return 1

    import rclpy
    from rclpy.action import ActionClient
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from mobilevlm_ros.action import Ask as AskAction
    from mobilevlm_ros.ros.qos import ASK_SERVICE_QOS
    from mobilevlm_ros.srv import Ask as AskService

    from ..ros.ask_client import format_result, result_dict

    ns = "/" + a.namespace.strip("/")
    node_name = f"{ns}/mobilevlm"
    remaps = ["-r", f"__ns:={ns}"] + (["-r", f"~/front/image:={a.image_topic}"] if a.image_topic else [])
    node_proc = NodeUnderTest(model.resolve(), params_file=params, ros_args=remaps, echo=not a.quiet,
                              params={"diagnostics_period_s": "1.0"})
    print(f"mobilevlm-demo: starting the node: {' '.join(node_proc.cmd)}", file=sys.stderr)

    rclpy.init()
    client_node = rclpy.create_node("mobilevlm_demo_client")
    executor = SingleThreadedExecutor()
    executor.add_node(client_node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    published = [0]
    if not a.image_topic:
        pub = client_node.create_publisher(Image, f"{node_name}/front/image", qos_profile_sensor_data)

        def publish_frame():            # a 640x480 scene at 10 Hz
            frame = render_frame(0, published[0], 10.0, 640, 480)
            pub.publish(image_msg(frame, client_node.get_clock().now().to_msg()))
            published[0] += 1

        client_node.create_timer(0.1, publish_frame)

    annotated: list = []
    if a.annotated_png:
        client_node.create_subscription(Image, f"{node_name}/annotated", annotated.append, 10)

    def wait_future(future, deadline) -> bool:
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        while not done.wait(0.2):
            if time.monotonic() > deadline or not node_proc.alive():
                return False
        return True

    code = 1
    deadline = time.monotonic() + a.timeout
    try:
        srv = client_node.create_client(AskService, f"{node_name}/ask", qos_profile=ASK_SERVICE_QOS)
        while not srv.wait_for_service(timeout_sec=0.5):
            if not node_proc.alive():
                raise RuntimeError(f"the node exited with status {node_proc.proc.returncode} before serving")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node_name}/ask did not appear within {a.timeout:g} s")
        print(f"mobilevlm-demo: {node_name}/ask is up; asking: {a.question!r}", file=sys.stderr)
        while True:
            req = AskService.Request()
            req.question, req.max_new_tokens, req.temperature = a.question, a.max_new_tokens, 0.0
            if a.stream:
                action = ActionClient(client_node, AskAction, f"{node_name}/ask_stream")
                if not action.wait_for_server(timeout_sec=max(0.1, deadline - time.monotonic())):
                    raise RuntimeError(f"{node_name}/ask_stream not found")
                goal = AskAction.Goal()
                goal.question, goal.max_new_tokens, goal.temperature = a.question, a.max_new_tokens, 0.0
                shown = [""]

                def on_feedback(fb):
                    text = fb.feedback.text
                    sys.stdout.write(text[len(shown[0]):] if text.startswith(shown[0]) else "\rA: " + text)
                    sys.stdout.flush()
                    shown[0] = text

                sys.stdout.write(f"Q: {a.question}\nA: ")
                sys.stdout.flush()
                gf = action.send_goal_async(goal, feedback_callback=on_feedback)
                if not wait_future(gf, deadline) or not gf.result().accepted:
                    raise RuntimeError("the goal was not accepted")
                rf = gf.result().get_result_async()
                if not wait_future(rf, deadline):
                    raise RuntimeError("no result from the action")
                if shown[0]:
                    sys.stdout.write("\n")
                res = result_dict(rf.result().result)
            else:
                future = srv.call_async(req)
                if not wait_future(future, deadline):
                    raise RuntimeError(f"no answer from {node_name}/ask within {a.timeout:g} s")
                res = result_dict(future.result())
            if not res["success"] and "no frame" in res["error"] and time.monotonic() < deadline:
                time.sleep(0.5)         # the node is up but has not received a frame yet
                continue
            break
        text = format_result(res)
        if a.stream and res["success"]:
            text = text.split("\n", 1)[1]
        else:
            text = f"Q: {a.question}\nA: {text}"
        print(text)
        if not a.image_topic:
            print(f"[{published[0]} sample frames published]")
        if res["success"] and has_random_decoder(model):
            print(RANDOM_NOTE.format(model=model))
        code = 0 if res["success"] else 1
        if a.annotated_png and res["success"]:
            code = save_annotated(a.annotated_png, annotated, srv, req, wait_future, deadline)
    except RuntimeError as e:
        print(f"mobilevlm-demo: {e}", file=sys.stderr)
        if not node_proc.alive() and a.quiet:
            print(node_proc.log(40), file=sys.stderr)
    except KeyboardInterrupt:
        print("mobilevlm-demo: interrupted", file=sys.stderr)
    finally:
        rc, _ = node_proc.stop(timeout=20.0)     # None: it had to be killed
        executor.shutdown(timeout_sec=2.0)
        client_node.destroy_node()
        rclpy.try_shutdown()
        spinner.join(timeout=2.0)
    if rc != 0:
        print(f"mobilevlm-demo: the node exited with status {rc}", file=sys.stderr)
        code = 1
    else:
        print("mobilevlm-demo: node stopped cleanly", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
