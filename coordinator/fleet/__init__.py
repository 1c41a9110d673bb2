"""The fleet: deployments and their replicas on one pool of workers, the registry, planning (bytes and time),
placement, membership, calibration, autoscaling, model management and the calls to workers."""
