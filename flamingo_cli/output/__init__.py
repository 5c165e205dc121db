"""The package that owns the output dataset (OUT), one module per job.

``layout`` (schema, runs, parts, current rows), ``columns`` (passthrough typing), ``export``,
``folder`` (OUT over fsspec), ``objstore`` (S3 conditional writes), ``writers`` (parts committed
exactly once). Nothing is imported here, so ``import flamingo_cli.output`` stays instant.
"""
