"""Replay of rosbag2 bags through the node's engine, offline (`mobilevlm-replay`, docs/replay.md).

- bagio:     reading and writing rosbag2 bags (rosbags: sqlite3 and mcap, no ROS install)
- questions: the questions file and the schedule of its questions on a bag's clock
- runner:    one bag through the engine on the bag's clock -> one JSON line per question
- compare:   two runs of a bag, line by line (--expect)
- fleet:     many bags into an output folder (jobs, the worker, resume, the run's summary),
             serially here; ray_pool: the same on Ray actors; fleet_cli: `--out-dir`
- report:    a fleet run against a previous one, as one self-contained report.html
- cli:       the mobilevlm-replay command

Imports no rclpy: bags are read with rosbags, fields converted as the ROS adapter converts them.
"""
