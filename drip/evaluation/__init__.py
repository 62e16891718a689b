"""What a trained detector is judged and shown by: ``metrics`` (COCO metrics with pycocotools,
during training, for ``drip evaluate`` and for ``drip infer``), ``report`` (the session's
pictures and ``index.html``) and ``results`` (the files ``drip infer`` writes, and their drawing).
"""
