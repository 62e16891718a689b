"""The training engine under ``drip.stages.train``, one module per concern.

``loop``: the ``Trainer`` (a small ``run_step`` and the hooks around it, as detectron2's
``train_loop.py``) and the data loader it reads; ``hooks``: what happens between steps (logging,
evaluation and the best model, checkpoints); ``checkpoints``: finding, writing, pruning and
checking them; ``optim``: optimizer, learning-rate schedule and EMA; ``events``: what goes to
TensorBoard and ``metrics.jsonl``; ``distributed``: a process's place in a torchrun group (which
one writes, how the global batch is split, the collectives). The stage (``drip.stages.train``)
wires them, as torchvision's ``train.py`` wires its ``engine.py``.
"""
