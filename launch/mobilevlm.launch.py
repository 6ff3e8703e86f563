"""Start the MobileVLM node on a robot.

    ros2 launch mobilevlm_ros mobilevlm.launch.py image:=/camera/image_raw model_path:=/models/MobileVLM_V2-1.7B
    ros2 launch mobilevlm_ros mobilevlm.launch.py namespace:=robot1 params_file:=/etc/robot/mobilevlm.yaml \
        image_compressed:=/camera/image_raw/compressed

Arguments:
  namespace         namespace of the node (default: none -> /mobilevlm)
  node_name         name of the node (default: mobilevlm)
  params_file       parameters file (default: config/mobilevlm.yaml of this package)
  model_path        overrides model_path of the parameters file when not empty
  image             remap the default camera's ~/<camera>/image to this topic (e.g. /camera/image_raw)
  image_compressed  remap the default camera's ~/<camera>/image/compressed to this topic
  camera            name of the camera the two remaps apply to (default: front)
  log_level         debug | info | warn | error (default: info)

The node is a lifecycle node; with the parameter autostart (default true) it configures and
activates itself, otherwise drive it with `ros2 lifecycle set /mobilevlm configure` / `activate`.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode


def _node(context, *args, **kwargs):
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    camera = arg("camera")
    remappings = []
    if arg("image"):
        remappings.append((f"~/{camera}/image", arg("image")))
    if arg("image_compressed"):
        remappings.append((f"~/{camera}/image/compressed", arg("image_compressed")))
    parameters = [arg("params_file")]
    if arg("model_path"):
        parameters.append({"model_path": arg("model_path")})
    return [LifecycleNode(
        package="mobilevlm_ros",
        executable="mobilevlm_node",
        name=arg("node_name"),
        namespace=arg("namespace"),
        parameters=parameters,
        remappings=remappings,
        ros_arguments=["--log-level", arg("log_level")],
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("mobilevlm_ros"), "config", "mobilevlm.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("node_name", default_value="mobilevlm", description="name of the node"),
        DeclareLaunchArgument("params_file", default_value=default_params, description="parameters file"),
        DeclareLaunchArgument("model_path", default_value="",
                              description="checkpoint or artifacts folder (overrides the parameters file)"),
        DeclareLaunchArgument("camera", default_value="front",
                              description="camera the image/image_compressed remaps apply to"),
        DeclareLaunchArgument("image", default_value="",
                              description="sensor_msgs/Image topic of that camera, e.g. /camera/image_raw"),
        DeclareLaunchArgument("image_compressed", default_value="",
                              description="sensor_msgs/CompressedImage topic of that camera"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug|info|warn|error"),
        OpaqueFunction(function=_node),
    ])
