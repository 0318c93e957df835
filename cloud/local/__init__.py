"""The local backend: boto3-shaped S3, SageMaker and Greengrass v2 on SQLite + files.

``windfleet.cloud.backends.Backend.local()`` builds these over one store
(``$WINDFLEET_HOME`` or ``~/.windfleet``).  See each module for the subset
served and, in :mod:`.greengrass`, the device-side API the local runtime uses.
"""

from .errors import client_error
from .greengrass import LocalGreengrassV2, artifact_digest, component_arn, thing_arn, thing_group_arn
from .s3 import LocalS3, split_uri
from .sagemaker import LocalSageMaker
from .store import Store, default_home

__all__ = ["LocalGreengrassV2", "LocalS3", "LocalSageMaker", "Store", "default_home", "client_error",
           "artifact_digest", "component_arn", "thing_arn", "thing_group_arn", "split_uri"]
