"""Stage 4, configure: set up the network and write the session's ``pipeline.config``.

Reads ``label_map.pbtxt`` (from split). Checks that the network and its starting weights load
(downloading COCO weights into the session folder's ``cache/`` now, not an hour into training),
fills in the values left to Drip (the optimizer and learning rate), and writes the resolved config as
``pipeline.config``: a commented YAML file the user may edit before ``--resume_training``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from .. import console
from ..config import Config
from ..data.labelmap import LabelMap
from ..session import Session


def run(session: Session, config: Config, check_model: bool = True, chosen: Iterable[str] = ()) -> Config:
    """Return the resolved config, written to ``session.config_path``. ``chosen`` names the values
    the user set (flags, or a pipeline.config already written): the family's recipe leaves them."""
    from ..detectors import models

    if check_model:
        config = _check_model(session, config)
    optimizer = models.resolve_optimizer(config.optimizer, config.number_of_steps, config.network)
    if optimizer != config.optimizer:
        config = dataclasses.replace(config, optimizer=optimizer)
        console.info(f"optimizer {optimizer} (auto: {config.number_of_steps} steps, {config.network})")
    config = _family_recipe(config, set(chosen))
    if config.learning_rate is None:
        lr = models.default_learning_rate(config.network, config.batch_size, config.optimizer)
        config = dataclasses.replace(config, learning_rate=lr)
        console.info(f"learning rate {lr:g} (the {config.network} default for batch {config.batch_size})")
    write(session, config)
    session.record_stage("configure", network=config.network, weights=config.weights, learning_rate=config.learning_rate)
    return config


def _check_model(session: Session, config: Config) -> Config:
    """Build the network once, which downloads its starting weights into the session's cache now;
    with ``--weights_fallback none`` weights that cannot be downloaded become ``--weights none``."""
    from ..detectors import models
    from ..errors import DownloadError

    classes = LabelMap.read(session.require(session.label_map_path, "split"))
    try:
        models.build_model(config.network, len(classes) + 1, config.weights, config.image_size, session.cache,
                           list(classes.names))
    except DownloadError as exc:
        if config.weights_fallback != "none":
            raise
        console.warn(f"{exc.what_failed}; training from scratch instead (--weights_fallback none)")
        config = dataclasses.replace(config, weights="none")
    return config


def _family_recipe(config: Config, chosen: set[str]) -> Config:
    """The network family's own recipe values (e.g. D-FINE's gradient clipping at 0.1) where the
    config still holds Drip's default for them and the user did not choose it (``--online_augmentation
    flip`` given on the command line stays flip, though it is Drip's default)."""
    from .. import detectors
    from ..detectors import models

    wanted = detectors.recipe(models.network_name(config.network))
    defaults = Config()
    changes = {k: v for k, v in wanted.items()
               if k not in chosen and getattr(config, k) == getattr(defaults, k) and getattr(config, k) != v}
    if not changes:
        return config
    shown = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in changes.items())
    console.info(f"{shown} (the {config.network} recipe)")
    return dataclasses.replace(config, **changes)


def write(session: Session, config: Config) -> None:
    """Write ``pipeline.config`` atomically (``Config.write``)."""
    config.write(session.config_path)
