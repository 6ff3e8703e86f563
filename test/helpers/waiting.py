"""Waiting for something to happen, with a deadline: the one way tests wait."""
import threading
import time


def wait_for(predicate, timeout=30.0, interval=0.05):
    """Poll `predicate` until it returns a true value or `timeout` seconds pass. Returns its last
    value: true when it came in time (use it: `assert wait_for(...)`, `x = wait_for(...)`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def wait_future(future, timeout):
    """The result of a future with add_done_callback (rclpy's, concurrent.futures'), failing the
    test when it is not done within `timeout` seconds."""
    done = threading.Event()
    future.add_done_callback(lambda _f: done.set())
    assert done.wait(timeout), f"no reply within {timeout} s"
    return future.result()
