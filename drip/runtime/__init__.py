"""Where the stages run: in this process, in Drip's Docker container, or on several processes.

``local``: the commands (``drip train``, ``stage``, ``infer``, ``evaluate``, ``export``,
``report``, ``networks``) run here, stage after stage: the only module that knows the order of
the stages. ``docker``: the same commands in Drip's container, started from the host through the
Docker SDK, with ``relay`` bringing TensorBoard from the container's loopback to the host's.
``torchrun``: training or inference on several processes and machines, each process a
``worker``. ``audit``: ``drip audit`` and ``drip select``; ``folds`` runs the audit's folds side
by side, a process each.

``docker``, ``relay`` and ``torchrun`` run on the host and import only the standard library (and
the Docker SDK); this package's ``__init__`` imports nothing, so reaching them costs no PyTorch.
"""
