"""The local device runtime: what the Greengrass nucleus does, for one gateway.

``recipe`` (manifests, variables, configuration), ``sources`` (where deployments
come from), ``runtime`` (processes, states, deployments), ``fleet`` (many
gateways on one machine) and ``cli``.  ``broker`` (Mosquitto) belongs to the bus.
"""
