"""The pipeline stages, one module each, run in this order by ``drip train``.

Each module has one entry function, ``run(session, config)``, that reads and writes only files in
the session folder (see ``drip.session``) and returns a small summary of what it produced.
"""

ORDER = ("split", "augment", "records", "configure", "train")
