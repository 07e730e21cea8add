"""Validation of restored data: integrity and equivalence checks, Great Expectations suites, drills.

Modules, in the order a drill uses them: ``checks`` (integrity_check, foreign_key_check, schema
and restore-equivalence against the manifest), ``suites`` (GX suites run on the restored file
through GX's SQLite datasource), ``profile`` (starter suites from a live database), ``drill``
(restore to scratch, validate, measure RTO and RPO, record), ``subset`` (which packs this
week's integrity validation reads). Great Expectations is imported only inside ``suites``.
"""
