"""Two Ray nodes on this machine, on loopback only, for the cluster test: prints the head's
address, and stops both nodes when its stdin closes.

    python tests/ray_cluster.py
"""

import os
import sys

# Ray's switch that makes every node's address 127.0.0.1 (read when ray is imported).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from ray.cluster_utils import Cluster  # noqa: E402

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                        "include_dashboard": False})
try:
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    print(cluster.address, flush=True)  # the test reads the first line that starts with 127.0.0.1:
    sys.stdin.read()
finally:
    cluster.shutdown()
