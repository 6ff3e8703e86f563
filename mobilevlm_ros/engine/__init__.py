"""The runtime between the cameras and the questions: frame stores, the vision and generation
workers, the request queue and its policies. Imports no ROS (the node, replay and the benchmarks
run the same engine)."""
