"""mobilevlm-ask-node: ask the running MobileVLM node a question (for machines without the ros2 CLI).

    mobilevlm-ask-node "What is in front of the robot?" [--camera C] [--stream] [--timeout S]
                      [--node /mobilevlm] [--max-new-tokens N] [--temperature T] [--top-p P]
                      [--seed S] [--json]

Without --stream it calls the service <node>/ask; with --stream it sends a goal to the action
<node>/ask_stream and prints the answer as it grows (Ctrl-C cancels the goal). Prints the answer,
the stamp and frame_id of the frame it describes, and the timings. Exit status: 0 answered,
1 the node answered with an error (or the goal was cancelled), 2 no answer (node not found, timeout).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import rclpy
from rclpy.action import ActionClient
from rclpy.node import Node

from mobilevlm_ros.action import Ask as AskAction
from mobilevlm_ros.ros.qos import ASK_SERVICE_QOS
from mobilevlm_ros.srv import Ask as AskService

RESULT_FIELDS = ("success", "answer", "error", "camera", "prompt_tokens", "completion_tokens",
                 "finish_reason", "vision_ms", "prefill_ms", "decode_ms", "total_ms", "frame_age_ms")


def result_dict(res) -> dict:
    """A service response / action result as a plain dict (with stamp and frame_id)."""
    d = {k: getattr(res, k) for k in RESULT_FIELDS}
    d["stamp"] = res.header.stamp.sec + res.header.stamp.nanosec * 1e-9
    d["frame_id"] = res.header.frame_id
    return d


def format_result(d: dict) -> str:
    lines = [d["answer"] if d["success"] else f"error: {d['error']}"]
    if d["success"] or d["finish_reason"] == "cancelled":
        lines.append(f"[camera {d['camera']}, frame stamp {d['stamp']:.9f} ({d['frame_id'] or 'no frame_id'}), "
                     f"frame age {d['frame_age_ms']:.0f} ms]")
        lines.append(f"[{d['completion_tokens']} tokens, {d['finish_reason']}; vision {d['vision_ms']:.0f} ms, "
                     f"prefill {d['prefill_ms']:.0f} ms, decode {d['decode_ms']:.0f} ms, "
                     f"total {d['total_ms']:.0f} ms]")
    return "\n".join(lines)


def fill_request(req, a):
    req.question = a.question
    req.camera = a.camera
    req.max_new_tokens = a.max_new_tokens
    req.temperature = a.temperature
    req.top_p = a.top_p
    req.seed = a.seed
    return req


def _wait(node, future, deadline) -> bool:
    while not future.done():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        rclpy.spin_until_future_complete(node, future, timeout_sec=min(left, 0.5))
    return True


def ask_service(node: Node, name: str, a, deadline: float):
    client = node.create_client(AskService, f"{name}/ask", qos_profile=ASK_SERVICE_QOS)
    if not client.wait_for_service(timeout_sec=max(0.0, deadline - time.monotonic())):
        raise TimeoutError(f"service {name}/ask not found (is the node running and active?)")
    future = client.call_async(fill_request(AskService.Request(), a))
    if not _wait(node, future, deadline):
        raise TimeoutError(f"no answer from {name}/ask within {a.timeout:g} s")
    return future.result()


def ask_action(node: Node, name: str, a, deadline: float, out=sys.stdout):
    client = ActionClient(node, AskAction, f"{name}/ask_stream")
    if not client.wait_for_server(timeout_sec=max(0.0, deadline - time.monotonic())):
        raise TimeoutError(f"action {name}/ask_stream not found (is the node running and active?)")
    shown = [""]

    def on_feedback(msg):
        text = msg.feedback.text
        if not a.json:
            # print the new part; rewrite the line if the text changed before the end (detokenization)
            if text.startswith(shown[0]):
                out.write(text[len(shown[0]):])
            else:
                out.write("\r" + text)
            out.flush()
        shown[0] = text

    goal_future = client.send_goal_async(fill_request(AskAction.Goal(), a), feedback_callback=on_feedback)
    if not _wait(node, goal_future, deadline):
        raise TimeoutError(f"goal not accepted by {name}/ask_stream within {a.timeout:g} s")
    handle = goal_future.result()
    if not handle.accepted:
        raise RuntimeError("goal rejected")
    result_future = handle.get_result_async()
    try:
        ok = _wait(node, result_future, deadline)
    except KeyboardInterrupt:
        cancel = handle.cancel_goal_async()
        _wait(node, cancel, time.monotonic() + 5.0)
        ok = _wait(node, result_future, time.monotonic() + 5.0)
    if not ok:
        handle.cancel_goal_async()
        raise TimeoutError(f"no result from {name}/ask_stream within {a.timeout:g} s (goal cancelled)")
    if shown[0] and not a.json:
        out.write("\n")
    return result_future.result().result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-ask-node", description=__doc__.split("\n\n")[0])
    ap.add_argument("question")
    ap.add_argument("--camera", default="", help="camera name (default: the node's first camera)")
    ap.add_argument("--stream", action="store_true", help="use the action and print tokens as they come")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the node and the answer")
    ap.add_argument("--node", default="/mobilevlm", help="the node's fully qualified name")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0 = the node's default")
    ap.add_argument("--temperature", type=float, default=-1.0, help="negative = the node's default; 0 = greedy")
    ap.add_argument("--top-p", type=float, default=-1.0, help="negative = the node's default")
    ap.add_argument("--seed", type=int, default=-1, help="-1 = the node's default")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    name = "/" + a.node.strip("/")

    rclpy.init()
    node = Node("mobilevlm_ask_client")
    deadline = time.monotonic() + a.timeout
    code = 0
    try:
        if a.stream:
            res = ask_action(node, name, a, deadline)
        else:
            res = ask_service(node, name, a, deadline)
        d = result_dict(res)
        if a.json:
            print(json.dumps(d))
        else:
            text = format_result(d)
            if a.stream and d["answer"]:        # the answer was already printed token by token
                text = text.split("\n", 1)[1] if d["success"] else text
            print(text)
        code = 0 if d["success"] else 1
    except (TimeoutError, RuntimeError) as e:
        print(f"mobilevlm-ask-node: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
