"""DC-CCL on real device fleets through Flower (``pip install -e ".[flower]"``).

The cloud is a Flower ``ServerApp`` (:mod:`dcccl.flower.server_app`) that runs the pipeline as ``dcccl pipeline`` does,
except that each device stage is sent to the devices; a device is a ``ClientApp`` (:mod:`dcccl.flower.client_app`) that
trains with the pipeline's own device stage. :mod:`dcccl.flower.records` converts exports to Flower records and back.
"""
