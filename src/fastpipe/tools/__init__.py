"""Tooling around fastpipe, outside the core: ``fastpipe demo``, ``fastpipe bench``, the
embedded S3 server they (and the tests) run, and the time-against-size fit.

Nothing in the core imports this package (``tests/test_layering.py`` checks it): the
library works the same whether or not a benchmark ever ran. The tools use the public API
(``fastpipe.run``, ``fastpipe.Engine``, ``fastpipe.stages``) and the console helpers the
command line shares (:mod:`fastpipe._console`).

- :mod:`fastpipe.tools.locals3`: SeaweedFS on loopback (``LocalS3``)
- :mod:`fastpipe.tools.s3`: a plain botocore client for uploads and bucket creation
- :mod:`fastpipe.tools.demo`: ``fastpipe demo``
- :mod:`fastpipe.tools.bench`: ``fastpipe bench``
- :mod:`fastpipe.tools.fit`: the linear fit of end-to-end time against object size
"""
