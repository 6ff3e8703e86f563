"""What the test modules share, imported as a package: `from helpers.<module> import ...`
(setup.cfg's [tool:pytest] pythonpath puts test/ on sys.path). conftest.py holds only the session's
set-up, fixtures and hooks.

    skips             skip_reason_if_missing(module), launch_skip_reason(), LAUNCH_DIR
    waiting           wait_for(predicate, timeout), wait_future(future, timeout)
    frames            synthetic_frame(h, w, seed), FRAMES (image shapes)
    ros               the test's side of the ROS graph (Client, match_service, ...); needs rclpy
    install           a command run with its output shown, the checkout as a wheel (fresh-venv tests)
    logits            comparing logits of decoders whose arithmetic differs
    malformed_corpus  the bad frames and requests the node must survive, each with its error
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
