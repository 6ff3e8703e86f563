"""QoS of ~/ask, shared by the node and its clients (ask client, demo, flood, tests).

Reliable with a deep history on both sides. With ROS's default service depth of 10, a burst of
responses (many clients answered "busy" at once) overwrote responses not yet taken: every client's
reader can see the other clients' responses, so a client lost its own and waited forever (6-9 of
~1000 requests in a 15 s flood with 20 clients; 0 with depth 1000).
"""
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

ASK_SERVICE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
